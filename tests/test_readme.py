"""The README is true: its "Using it" block runs as written, its links point inside the repo,
and its counts of sensors and schedules match the Definitions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def block_after(heading: str) -> str:
    section = README.split(f"\n## {heading}\n", 1)[1]
    return section.split("```sh\n", 1)[1].split("\n```", 1)[0]


@pytest.mark.slow
def test_the_using_it_block_runs_as_written(tmp_path: Path) -> None:
    script = block_after("Using it")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCAT_DT_", "DAGSTER"))}
    env["HOME"] = str(tmp_path)  # ~/ccat-data lands here
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "observation obs-0042 started" in done.stdout
    assert "scan-001.dat" in done.stdout  # the staged file, listed by ls
    assert "Traceback" not in done.stderr
    staged = list((tmp_path / "ccat-data" / "sites" / "ramses" / "processing").rglob("*.dat"))
    assert staged == []  # released, and the purge removed them


def test_links_inside_the_repository_exist() -> None:
    targets = re.findall(r"\]\(([^)#]+)\)", README)
    assert targets
    for target in targets:
        assert not target.startswith(("http", "/", "..")), target
        assert (REPO / target).exists(), target


def test_the_counts_of_sensors_and_schedules_are_right(config: object) -> None:
    from ccat_assets.definitions import build_definitions

    repository = build_definitions(config).get_repository_def()  # type: ignore[arg-type]
    sensors = sorted(s.name for s in repository.sensor_defs)
    schedules = [s.name for s in repository.schedule_defs]
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
             "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen"]
    assert f"the {words[len(sensors)]} sensors" in README
    assert all(f"`{name}`" in README for name in sensors)
    assert schedules == ["fixity_scrub"] and "the `fixity_scrub` schedule" in README
    assert "four sensors" not in README

"""A sensor or schedule an operator stopped (the UI's toggle, `dagster sensor stop`) stays
stopped under `ccat-dt drive`, as under the daemon: a purge sensor stopped to freeze deletions
deletes nothing until it is started again, a stopped scrub reads nothing. Checked on the
disks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance
from dagster._core.test_utils import in_process_test_workspace
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from tests.faults.pipeline import deployment
from tests.helpers import observe

DAGSTER = str(Path(sys.executable).with_name("dagster"))


def dagster_cli(config: Config, instance: DagsterInstance, *argv: str) -> None:
    """The `dagster` command line on this deployment's code location and instance."""
    env = {**os.environ, "CCAT_DT_CONFIG": str(config.path),
           "DAGSTER_HOME": instance.root_directory}
    subprocess.run([DAGSTER, *argv, "-m", "ccat_assets.definitions"], env=env, check=True,
                   capture_output=True, text=True, timeout=120)


def toggle(config: Config, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch,
           *commands: tuple[str, str, str]) -> None:
    """(kind, action, name) as `dagster sensor stop NAME` carries each out (the UI's toggle
    does the same): instance.stop_sensor/start_schedule/... on the instigator of the loaded
    code location, here loaded once in this process; the command loads it in a code server
    of its own (~5 s a command). The instigator's origin is this process's, not the
    command's or the UI's: a start here does not undo their stop (the next test uses the
    real command for both)."""
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    origin = LoadableTargetOrigin(executable_path=sys.executable,
                                  module_name="ccat_assets.definitions", attribute="defs")
    with in_process_test_workspace(instance, origin) as workspace:
        [location] = workspace.code_locations
        [repository] = location.get_repositories().values()
        for kind, action, name in commands:
            found = (repository.get_sensor(name) if kind == "sensor"
                     else repository.get_schedule(name))
            if action == "start":
                getattr(instance, f"start_{kind}")(found)
            else:
                getattr(instance, f"stop_{kind}")(found.get_remote_origin_id(),
                                                  found.selector_id, found)


def sources(config: Config) -> list[Path]:
    root = config.resolve_root("sites/ccat/instruments")
    return [path for path in root.rglob("*.dat")]


def test_a_purge_sensor_stopped_by_the_operator_deletes_nothing_until_started(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    observe(config, opsdb, observations=1, files=1)
    toggle(config, instance, monkeypatch, ("sensor", "stop", "purge_sensor"),
           ("schedule", "stop", "fixity_scrub"))
    lines: list[str] = []

    report = drive(build_definitions(config), instance, due_schedules=True, log=lines.append)

    assert report.failed == []
    assert len(sources(config)) == 2  # archived, and kept: the purge sensor is stopped
    for site in ("cologne", "us"):
        assert len(list(config.resolve_root(f"sites/{site}/lta").rglob("*.tar"))) == 2
    assert any(line.startswith("purge_sensor is stopped") for line in lines), lines
    assert not any(key.startswith(("purge:", "scrub:")) for key in report.launched)

    toggle(config, instance, monkeypatch, ("sensor", "start", "purge_sensor"),
           ("schedule", "start", "fixity_scrub"))
    again = drive(build_definitions(config), instance, due_schedules=True)
    assert again.failed == []
    assert sources(config) == []
    assert any(key.startswith("scrub:") for key in again.launched), again.launched


def test_a_copy_sensor_stopped_by_the_operator_holds_its_work_from_the_sweep_too(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """The re-attempt sensor's sweep asks for work no run has done for a while (an OpsDB
    restored from a backup); a stage an operator holds by stopping its sensor is not such
    work: nothing is copied until the sensor is started again."""
    config = deployment(tmp_path / "deploy", policies={"unattended_after_s": 0.5})
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1, files=1)
    dagster_cli(config, instance, "sensor", "stop", "site_copy_sensor")

    first = drive(build_definitions(config), instance)
    time.sleep(1.0)  # twice the quiet time: the sweep would ask now
    again = drive(build_definitions(config), instance, wait_s=2)

    assert first.failed == [] and again.failed == [] and again.launched == []
    assert all(key.startswith("package:") for key in first.launched), first.launched
    for site in ("cologne", "us"):  # the disks: nothing left the observatory
        assert list(config.resolve_root(f"sites/{site}").rglob("*.tar")) == []

    dagster_cli(config, instance, "sensor", "start", "site_copy_sensor")
    assert drive(build_definitions(config), instance).failed == []
    assert len(list(config.resolve_root("sites/cologne/lta").rglob("*.tar"))) == 2

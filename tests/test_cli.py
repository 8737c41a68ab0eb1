"""`ccat-dt`: init sets up a deployment; filing works from the command line; bad input exits 2,
says what is wrong on stderr and changes nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from ccat_dt.config import load_config
from ccat_dt.defaults import CONFIG_NAME
from ccat_dt.opsdb.database import OpsDB, dispose_engines
from tests.helpers import run_cli, write

MODULE = "primecam/f280"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCAT_DT_CONFIG", raising=False)
    monkeypatch.delenv("CCAT_DT_OPSDB_URL", raising=False)


@pytest.fixture
def deploy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """`ccat-dt init` into tmp_path/deploy; returns the config file."""
    assert run_cli("init", str(tmp_path / "deploy")) == 0
    capsys.readouterr()
    return tmp_path / "deploy" / CONFIG_NAME


@pytest.fixture
def source(deploy: Path) -> Path:
    return deploy.parent / "sites" / "ccat" / "instruments"


@pytest.fixture
def obs(deploy: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert run_cli("--config", str(deploy), "observation", "start", "obs-1") == 0
    capsys.readouterr()
    return "obs-1"


def filed(config: Path) -> list[tuple[str, int]]:
    opsdb = OpsDB(load_config(config).opsdb_url)
    try:
        with opsdb.engine.connect() as conn:
            return [(row[0], row[1]) for row in conn.exec_driver_sql(
                "SELECT relative_path, size FROM raw_data_files ORDER BY relative_path")]
    finally:
        opsdb.dispose()


def snapshot(config: Path, source: Path) -> dict[str, Any]:
    opsdb = OpsDB(load_config(config).opsdb_url)
    state: dict[str, Any] = {}
    try:
        with opsdb.engine.connect() as conn:
            for table in ("raw_data_files", "physical_copies", "executed_obs_units"):
                state[table] = [tuple(row) for row in
                                conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY id")]
    finally:
        opsdb.dispose()
    tree = []
    for dirpath, dirs, files in os.walk(source):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            tree.append((os.path.relpath(path, source), info.st_size, info.st_mtime_ns))
    state["tree"] = sorted(tree)
    return state


def fails(capsys: pytest.CaptureFixture[str], config: Path, source: Path, *argv: str) -> str:
    """Run, expect exit 2 with a `ccat-dt: error:` message and no change; returns stderr."""
    before = snapshot(config, source)
    capsys.readouterr()
    assert run_cli(*argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("ccat-dt: error: ")
    assert "Traceback" not in err
    assert "filed" not in out
    assert snapshot(config, source) == before
    return err


# --- init -----------------------------------------------------------------------------------


def test_init_creates_a_deployment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "new"
    assert run_cli("init", str(directory)) == 0
    out = capsys.readouterr().out
    assert str(directory / CONFIG_NAME) in out
    config = load_config(directory / CONFIG_NAME)
    assert (directory / "opsdb.sqlite").is_file()
    for site in config.settings.sites:
        for location in site.locations:
            assert config.resolve_root(location.root).is_dir(), location.root
    assert (directory / "sites" / "ccat" / "instruments").is_dir()
    assert (directory / "dagster_home" / "dagster.yaml").is_file()
    with sqlite3.connect(directory / "opsdb.sqlite") as conn:
        locations = {f"{site}/{name}" for site, name in conn.execute(
            "SELECT s.short_name, l.name FROM data_locations l JOIN sites s ON s.id = l.site_id")}
    assert {"ccat/instruments", "ccat/buffer", "cologne/lta", "us/lta"} <= locations


def test_init_twice_keeps_an_edited_config(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "deploy"
    assert run_cli("init", str(directory)) == 0
    path = directory / CONFIG_NAME
    data = yaml.safe_load(path.read_text())
    data["policies"]["max_attempts"] = 7
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert run_cli("init", str(directory)) == 0
    assert load_config(path).settings.policies.max_attempts == 7
    assert (directory / "opsdb.sqlite").is_file()


def test_init_keeps_filed_data(deploy: Path, source: Path, obs: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    write(source / "a.dat")
    assert run_cli("--config", str(deploy), "file", "--observation", obs, "--module", MODULE,
               "a.dat") == 0
    assert run_cli("init", str(deploy.parent)) == 0
    assert filed(deploy) == [("a.dat", 9)]


def test_migrate_on_an_initialised_deployment(deploy: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--config", str(deploy), "migrate") == 0
    assert "up to date" in capsys.readouterr().out


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "ccat-dt"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: ccat-dt" in result.stdout
    for command in ("init", "observation", "file", "status"):
        assert command in result.stdout


# --- observations and filing ------------------------------------------------------------------


def uuid_in(text: str) -> uuid.UUID:
    return uuid.UUID(text.split("(uuid ", 1)[1].split(")", 1)[0])


def test_observation_start_says_what_it_started_and_is_idempotent(
        deploy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--config", str(deploy), "observation", "start", "obs-1") == 0
    first = capsys.readouterr().out.strip()
    assert first.startswith("observation obs-1 started (uuid ")
    assert "ccat-dt observation finish obs-1" in first  # and what comes next
    assert run_cli("--config", str(deploy), "observation", "start", "obs-1") == 0
    again = capsys.readouterr().out.strip()
    assert again.startswith("observation obs-1 is already open") and "nothing changed" in again
    assert uuid_in(again) == uuid_in(first)


def test_config_from_environment(deploy: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CCAT_DT_CONFIG", str(deploy))
    assert run_cli("observation", "start", "obs-env") == 0
    uuid_in(capsys.readouterr().out)


def test_file_paths(deploy: Path, source: Path, obs: str,
                    capsys: pytest.CaptureFixture[str]) -> None:
    write(source / "a.dat", b"12345")
    assert run_cli("--config", str(deploy), "file", "--observation", obs, "--module", MODULE,
               "a.dat") == 0
    assert "filed 1 file(s), 5 bytes; 0 unchanged" in capsys.readouterr().out
    assert filed(deploy) == [("a.dat", 5)]
    # filing the same file again is harmless
    assert run_cli("--config", str(deploy), "file", "--observation", obs, "--module", MODULE,
               "a.dat") == 0
    assert "filed 0 file(s), 0 bytes; 1 unchanged" in capsys.readouterr().out
    assert filed(deploy) == [("a.dat", 5)]


def test_file_directory(deploy: Path, source: Path, obs: str,
                        capsys: pytest.CaptureFixture[str]) -> None:
    write(source / "night" / "a.dat")
    write(source / "night" / "sub" / "b.dat")
    write(source / "other.dat")
    assert run_cli("--config", str(deploy), "file", "--observation", obs, "--module", MODULE,
               "--directory", "night") == 0
    assert "filed 2 file(s)" in capsys.readouterr().out
    assert [path for path, _ in filed(deploy)] == ["night/a.dat", "night/sub/b.dat"]


def test_file_manifest(deploy: Path, source: Path, obs: str, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    write(source / "a.dat", b"aa")
    write(source / "b.dat", b"bbb")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"path": "a.dat", "size": 2}) + "\n"
                        + json.dumps({"path": "b.dat"}) + "\n")
    assert run_cli("--config", str(deploy), "file", "--observation", obs, "--module", "chai/lfa",
               "--manifest", str(manifest)) == 0
    assert "filed 2 file(s), 5 bytes" in capsys.readouterr().out
    assert filed(deploy) == [("a.dat", 2), ("b.dat", 3)]


def test_file_explicit_source_location(deploy: Path, source: Path, obs: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    write(source / "a.dat")
    assert run_cli("--config", str(deploy), "file", "--observation", obs, "--module", MODULE,
               "--site", "ccat", "--location", "instruments", "a.dat") == 0
    assert "filed 1" in capsys.readouterr().out


def test_observation_finish(deploy: Path, obs: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--config", str(deploy), "observation", "finish", obs) == 0
    assert f"observation {obs} finished" in capsys.readouterr().out


def test_status(deploy: Path, source: Path, obs: str,
                capsys: pytest.CaptureFixture[str]) -> None:
    write(source / "a.dat")
    assert run_cli("--config", str(deploy), "file", "--observation", obs, "--module", MODULE,
               "a.dat") == 0
    capsys.readouterr()
    assert run_cli("--config", str(deploy), "status") == 0
    out = capsys.readouterr().out
    assert "raw files: 1" in out
    line = next(line for line in out.splitlines() if line.startswith("ccat/instruments"))
    assert line.split()[1:3] == ["source", "1"]


# --- bad input: exit 2, a clear message, nothing changed -----------------------------------------


def file_args(deploy: Path, *extra: str, observation: str = "obs-1",
              module: str = MODULE) -> list[str]:
    return ["--config", str(deploy), "file", "--observation", observation, "--module", module,
            *extra]


def test_rejects_path_outside_source(deploy: Path, source: Path, obs: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    err = fails(capsys, deploy, source, *file_args(deploy, "../etc/passwd"))
    assert "'../etc/passwd' is outside source location ccat/instruments" in err
    assert "nothing was filed" in err


def test_rejects_missing_file_and_files_nothing_of_the_batch(
        deploy: Path, source: Path, obs: str, capsys: pytest.CaptureFixture[str]) -> None:
    write(source / "good.dat")
    err = fails(capsys, deploy, source, *file_args(deploy, "good.dat", "missing.dat"))
    assert "file 'missing.dat' does not exist" in err
    assert filed(deploy) == []


def test_rejects_unknown_module(deploy: Path, source: Path, obs: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    write(source / "a.dat")
    err = fails(capsys, deploy, source, *file_args(deploy, "a.dat", module="primecam/f999"))
    assert "unknown module 'primecam/f999'" in err
    assert "primecam/f280" in err  # lists the known ones


def test_rejects_unknown_location(deploy: Path, source: Path, obs: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    write(source / "a.dat")
    err = fails(capsys, deploy, source, *file_args(deploy, "--location", "nope", "a.dat"))
    assert "unknown location 'ccat/nope'" in err
    assert "ccat/instruments" in err


def test_rejects_buffer_location(deploy: Path, source: Path, obs: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    write(deploy.parent / "sites" / "ccat" / "buffer" / "a.dat")
    write(source / "a.dat")
    err = fails(capsys, deploy, source, *file_args(deploy, "--location", "buffer", "a.dat"))
    assert "ccat/buffer is a buffer" in err
    assert "source location" in err


def test_rejects_finished_observation(deploy: Path, source: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--config", str(deploy), "observation", "start", "obs-done") == 0
    assert run_cli("--config", str(deploy), "observation", "finish", "obs-done") == 0
    write(source / "a.dat")
    err = fails(capsys, deploy, source,
                *file_args(deploy, "a.dat", observation="obs-done"))
    assert "observation 'obs-done' finished" in err
    # and it cannot be restarted either
    err = fails(capsys, deploy, source, "--config", str(deploy), "observation", "start",
                "obs-done")
    assert "cannot be restarted" in err


def test_rejects_unknown_observation(deploy: Path, source: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    write(source / "a.dat")
    err = fails(capsys, deploy, source, *file_args(deploy, "a.dat", observation="obs-never"))
    assert "observation 'obs-never' is unknown" in err


def test_rejects_invalid_observation_name(deploy: Path, source: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    err = fails(capsys, deploy, source, "--config", str(deploy), "observation", "start",
                "../bad name")
    assert "invalid observation name" in err


def test_rejects_no_paths(deploy: Path, source: Path, obs: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    write(source / "a.dat")
    err = fails(capsys, deploy, source, *file_args(deploy))
    assert "nothing to file" in err


def test_rejects_manifest_and_paths_together(deploy: Path, source: Path, obs: str,
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    write(source / "a.dat")
    write(source / "b.dat")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"path": "a.dat"}) + "\n")
    err = fails(capsys, deploy, source,
                *file_args(deploy, "--manifest", str(manifest), "b.dat"))
    assert "either --manifest or paths, not both" in err


def test_rejects_bad_manifest(deploy: Path, source: Path, obs: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    write(source / "a.dat")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"path": "a.dat"}) + "\n{not json\n")
    err = fails(capsys, deploy, source, *file_args(deploy, "--manifest", str(manifest)))
    assert "line 2: not valid JSON" in err


def test_rejects_missing_config(deploy: Path, source: Path, obs: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    write(source / "a.dat")
    err = fails(capsys, deploy, source, "--config", "/nonexistent.yaml", "file",
                "--observation", obs, "--module", MODULE, "a.dat")
    assert "/nonexistent.yaml: configuration file not found" in err


def test_rejects_no_config_at_all(deploy: Path, source: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    err = fails(capsys, deploy, source, "observation", "start", "obs-1")
    assert "CCAT_DT_CONFIG" in err
    assert "ccat-dt init" in err


def test_rejects_config_with_invalid_key(deploy: Path, source: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = yaml.safe_load(deploy.read_text())
    data["sites"][0]["locations"][0]["roots"] = data["sites"][0]["locations"][0].pop("root")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    err = fails(capsys, deploy, source, "--config", str(bad), "observation", "start", "obs-1")
    assert str(bad) in err
    assert "sites[0].locations[0].roots" in err
    assert "sites[0].locations[0].root: Field required" in err


def test_rejects_unmigrated_opsdb(deploy: Path, source: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.sqlite"
    sqlite3.connect(empty).close()
    data = yaml.safe_load(deploy.read_text())
    data["opsdb_url"] = f"sqlite:///{empty}"
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data, sort_keys=False))
    write(source / "a.dat")
    for argv in (["observation", "start", "obs-1"],
                 ["file", "--observation", "obs-1", "--module", MODULE, "a.dat"],
                 ["status"]):
        err = fails(capsys, deploy, source, "--config", str(other), *argv)
        assert "ccat-dt init" in err and "migrate" in err
    with sqlite3.connect(empty) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() \
            == []


def test_argparse_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("file", "a.dat") == 2  # --observation and --module are required
    assert "required" in capsys.readouterr().err
    assert run_cli("observation", "pause", "obs-1") == 2
    assert "invalid choice" in capsys.readouterr().err


# The commands an operator types to look (and `file`, which the instruments call) answer
# without importing Dagster, which alone takes over a second, nor the other packages they do
# not use: migrations, queues, metrics export, the service and its client, S3, progress bars,
# and on a SQLite OpsDB SQLAlchemy's PostgreSQL dialect (issue 17; speed: bench/).
_WITHOUT_DAGSTER = """
import sys
from ccat_assets.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert not exc.code, exc.code
loaded = sorted(name for name in sys.modules if name.split(".")[0] == "dagster")
print("DAGSTER-MODULES", len(loaded), loaded[:3])
heavy = {"alembic", "celery", "redis", "influxdb_client", "fastapi", "uvicorn", "httpx",
         "boto3", "botocore", "tqdm", "zlib_ng"}
print("HEAVY-MODULES", sorted({name.split(".")[0] for name in sys.modules} & heavy))
print("POSTGRESQL-DIALECT", "sqlalchemy.dialects.postgresql" in sys.modules)
"""


@pytest.mark.parametrize("argv", [
    ["status"], ["why", "obs-1"], ["purge", "--plan"],
    ["file", "--observation", "obs-1", "--module", MODULE, "a.dat"]])
def test_looking_and_filing_do_not_import_dagster(deploy: Path, source: Path, obs: str,
                                                  argv: list[str], tmp_path: Path) -> None:
    """`why` asks Dagster about the runs of a package with a stage not done, where there is a
    Dagster instance: here (obs-1 is still being filed) there is none."""
    write(source / "a.dat", b"12345")
    home = str(tmp_path / ("no-instance" if argv[0] == "why" else "deploy/dagster_home"))
    done = subprocess.run([sys.executable, "-c", _WITHOUT_DAGSTER, "--config", str(deploy),
                           *argv], capture_output=True, text=True, check=False,
                          env={**os.environ, "DAGSTER_HOME": home})
    assert done.returncode == 0, done.stderr
    assert "DAGSTER-MODULES 0 []" in done.stdout, done.stdout
    assert "HEAVY-MODULES []" in done.stdout, done.stdout
    assert "POSTGRESQL-DIALECT False" in done.stdout, done.stdout


def test_why_asks_dagster_about_a_package_not_done(deploy: Path, obs: str) -> None:
    """The check above can fail: the same harness sees Dagster loaded by `why` about an
    observation still being filed, where a Dagster instance is."""
    done = subprocess.run([sys.executable, "-c", _WITHOUT_DAGSTER, "--config", str(deploy),
                           "why", obs], capture_output=True, text=True,
                          check=False,
                          env={**os.environ, "DAGSTER_HOME": str(deploy.parent / "dagster_home")})
    assert "DAGSTER-MODULES 0 " not in done.stdout, (done.stdout, done.stderr)


def test_migrate_is_seen_importing_alembic(deploy: Path) -> None:
    """The heavy-module check above can fail too: the same harness sees Alembic, which only
    migrating imports."""
    done = subprocess.run([sys.executable, "-c", _WITHOUT_DAGSTER, "--config", str(deploy),
                           "migrate"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "HEAVY-MODULES ['alembic']" in done.stdout, done.stdout


def test_a_command_closes_the_opsdb_when_it_exits(deploy: Path, obs: str) -> None:
    """At exit a command closes its OpsDB connections itself (the interpreter's shutdown does
    not collect them: cli._at_exit): the SQLite OpsDB is left checkpointed, with no
    write-ahead log beside it."""
    dispose_engines()  # this process's own connections (the fixtures')
    wal = deploy.parent / "opsdb.sqlite-wal"
    done = subprocess.run([sys.executable, "-m", "ccat_assets.cli", "--config", str(deploy),
                           "status"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "raw files: 0" in done.stdout
    assert (deploy.parent / "opsdb.sqlite").stat().st_size > 0 and not wal.exists()


def test_a_file_name_neither_breaks_nor_fakes_a_line_of_what_the_commands_print(
        deploy: Path, source: Path, obs: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Before, a line break in a name started a line of its own ("DELETE ..." in the audit's
    findings here) and a terminal escape in it was sent to the terminal."""
    fake = "x\nDELETE obs-9_primecam-f280_p00  ccat  1.0 MB  passwd\x1b[2K"
    write(source / "obs-2" / fake)  # never filed: the audit finds it dark
    write(source / obs / "scan.dat")
    (source / obs / f"link{fake}").symlink_to(source / obs / "scan.dat")
    assert run_cli("--config", str(deploy), "file", "--observation", obs, "--module", MODULE,
                   "--directory", obs) == 0
    skipped = capsys.readouterr().err
    assert run_cli("--config", str(deploy), "audit") == 1
    out = capsys.readouterr().out
    shown = fake.replace("\n", "\\n").replace("\x1b", "\\x1b")
    assert f"link{shown}" in skipped and f"obs-2/{shown}" in out
    for text in (skipped, out):
        assert "\x1b" not in text
        assert not [line for line in text.splitlines() if line.startswith("DELETE")]

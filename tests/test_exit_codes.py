"""What the shell sees from `ccat-dt`: every documented exit status, one error line (a
traceback only with -v), quiet runs, and output piped into a reader that stops early.

The pipe and exit-status tests run the installed `ccat-dt` entry point in a subprocess, as a
shell would; the deployment they share is one small lifecycle driven to the end."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml

from ccat_assets import cli
from ccat_dt.defaults import CONFIG_NAME
from ccat_dt.marker import MARKER
from tests.helpers import run_cli, write

CCAT_DT = str(Path(sys.executable).parent / "ccat-dt")
MODULE = "primecam/f280"
PIPE_STATUS = 141  # 128 + SIGPIPE, as for any command whose reader went away


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CCAT_DT_", "DAGSTER_HOME"))}
    return {**env, **extra}


def ccat_dt(*argv: str, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CCAT_DT, *argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env or clean_env(), timeout=timeout,
                          check=False)


def into_closed_pipe(argv: Sequence[str], env: dict[str, str]) -> tuple[int, str]:
    """Run with stdout into a pipe whose reader has already gone (`| head -0`): the first
    write fails. Returns the exit status and stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([CCAT_DT, *argv], stdout=write_end, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, env=env, text=True, timeout=600,
                              check=False)
    finally:
        os.close(write_end)
    return done.returncode, done.stderr


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A deployment with one observation driven through the whole lifecycle (so that status,
    why, purge --plan, audit and stage all have something to say), plus an open observation
    with one filed file. Returns the configuration file."""
    root = tmp_path_factory.mktemp("exit-codes") / "deploy"
    saved = {k: os.environ.pop(k) for k in list(os.environ)
             if k.startswith("CCAT_DT_") or k == "DAGSTER_HOME"}
    try:
        assert run_cli("init", str(root)) == 0
        config = root / CONFIG_NAME
        source = root / "sites" / "ccat" / "instruments"
        c = ("--config", str(config))
        assert run_cli(*c, "observation", "start", "obs-1") == 0
        for i in range(3):
            write(source / "obs-1" / f"scan-{i}.dat", os.urandom(50_000))
        assert run_cli(*c, "file", "--observation", "obs-1", "--module", MODULE,
                          "--directory", "obs-1") == 0
        assert run_cli(*c, "observation", "finish", "obs-1") == 0
        assert run_cli(*c, "drive") == 0
        assert run_cli(*c, "observation", "start", "obs-open") == 0
        write(source / "open" / "a.dat", b"open data")
        yield config
    finally:
        os.environ.update(saved)


@pytest.fixture(scope="module")
def deploy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh deployment (`ccat-dt init`); returns the configuration file."""
    root = tmp_path_factory.mktemp("exit-codes-init") / "deploy"
    assert run_cli("init", str(root)) == 0
    return root / CONFIG_NAME


# --- output piped into a reader that stops: quiet, status 141 -----------------------------

PIPED = {
    "help": ["--help"],
    "init": ["init", "{tmp}/new"],
    "migrate": ["migrate"],
    "observation-start": ["observation", "start", "obs-open"],
    "observation-finish": ["observation", "finish", "obs-1"],
    "file": ["file", "--observation", "obs-open", "--module", MODULE, "open/a.dat"],
    "status": ["status"],
    "why": ["why", "obs-1_primecam-f280_p00"],
    "purge-plan": ["purge", "--plan"],
    "purge": ["purge"],
    "audit": ["audit"],
    "audit-repair": ["audit", "--repair"],
    "stage": ["stage", "--location", "ramses/processing", "--observation", "obs-1"],
    "instance-yaml": ["instance-yaml"],
    "drive": ["drive"],
    "retry": ["retry"],
    "worker": ["worker", "--site", "ccat"],  # stops at its first line, before exec'ing celery
}


@pytest.mark.parametrize("command", sorted(PIPED))
def test_output_into_a_closed_pipe_ends_quietly(command: str, request: pytest.FixtureRequest,
                                                tmp_path: Path) -> None:
    # status and --help need no lifecycle (they stay in `make test-fast`)
    config = request.getfixturevalue("deploy" if command in ("status", "help") else "lifecycle")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in PIPED[command]]
    env = clean_env(CCAT_DT_CONFIG=str(config),
                    CCAT_DT_CELERY_BROKER="redis://127.0.0.1:1/0")
    status, err = into_closed_pipe(argv, env)
    assert err == "", err
    assert status == PIPE_STATUS


def test_demo_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    status, err = into_closed_pipe(["demo", "--root", str(tmp_path / "demo"),
                                    "--observations", "1", "--files", "1",
                                    "--file-mb", "0.05"], clean_env())
    assert err == "", err
    assert status == PIPE_STATUS


def test_status_into_head_in_a_shell_pipeline(deploy: Path) -> None:
    """`ccat-dt status | head -1` as typed: one line out, nothing on stderr."""
    done = subprocess.run(["bash", "-c", f'set -o pipefail; "{CCAT_DT}" status | head -1'],
                          capture_output=True, text=True, timeout=600, check=False,
                          env=clean_env(CCAT_DT_CONFIG=str(deploy)))
    assert done.stdout.startswith("raw files: ")
    assert done.stdout.count("\n") == 1
    assert done.stderr == ""
    assert done.returncode in (0, PIPE_STATUS)  # 141 when status had more to write


# --- exit status 0 and 1 ------------------------------------------------------------------


def test_exit_0_when_done(deploy: Path) -> None:
    done = ccat_dt("--config", str(deploy), "status")
    assert done.returncode == 0
    assert done.stderr == ""


def test_audit_exits_1_with_problems_and_0_once_repair_fixed_them(tmp_path: Path) -> None:
    assert run_cli("init", str(tmp_path / "d")) == 0
    config = str(tmp_path / "d" / CONFIG_NAME)
    source = tmp_path / "d" / "sites" / "ccat" / "instruments"
    write(source / "x" / "a.dat", b"a")
    write(source / "x" / "b.dat", b"b")
    env = clean_env(CCAT_DT_CONFIG=config)
    assert ccat_dt("observation", "start", "o", env=env).returncode == 0
    assert ccat_dt("file", "--observation", "o", "--module", MODULE, "x/a.dat", "x/b.dat",
                   env=env).returncode == 0
    (source / "x" / "a.dat").unlink()

    found = ccat_dt("audit", env=env)
    assert found.returncode == 1, found.stderr
    assert "lost" in found.stdout and "1 problem(s), 0 repaired" in found.stdout

    repaired = ccat_dt("audit", "--repair", env=env)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "1 problem(s), 1 repaired" in repaired.stdout

    assert ccat_dt("audit", env=env).returncode == 0  # the lost copy is CORRUPT now


def test_audit_repair_exits_1_when_a_finding_is_only_reported(tmp_path: Path) -> None:
    """Dark files (on disk, unknown to OpsDB) are never repaired: still 1 after --repair."""
    assert run_cli("init", str(tmp_path / "d")) == 0
    write(tmp_path / "d" / "sites" / "ccat" / "buffer" / "stray.tar", b"?")
    done = ccat_dt("--config", str(tmp_path / "d" / CONFIG_NAME), "audit", "--repair")
    assert "dark" in done.stdout
    assert done.returncode == 1


def test_drive_with_a_failed_run_exits_1_with_one_line_and_its_cause(tmp_path: Path) -> None:
    """A source file changed after filing: packaging fails. The run is one line, its cause
    and the next step one more; no Dagster event log, no traceback on the terminal."""
    root = tmp_path / "d"
    assert run_cli("init", str(root)) == 0
    env = clean_env(CCAT_DT_CONFIG=str(root / CONFIG_NAME))
    source = root / "sites" / "ccat" / "instruments"
    write(source / "o" / "a.dat", b"filed bytes")
    for argv in (["observation", "start", "o"],
                 ["file", "--observation", "o", "--module", MODULE, "o/a.dat"],
                 ["observation", "finish", "o"]):
        assert ccat_dt(*argv, env=env).returncode == 0
    write(source / "o" / "a.dat", b"other bytes")

    done = ccat_dt("drive", env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    failed = [i for i, line in enumerate(lines) if line.startswith("FAILED")]
    assert len(failed) == 1
    assert lines[failed[0]].split()[1:3] == ["package", "o_primecam-f280_p00"]
    cause = lines[failed[0] + 1]
    assert "cause:" in cause and "a.dat" in cause and "ccat-dt why" in cause
    assert "1 run(s), 1 failed" in lines[-1]
    assert len(lines) <= 4
    assert "Traceback" not in done.stdout + done.stderr
    assert " - DEBUG - " not in done.stdout + done.stderr
    log = root / "logs" / "ccat-dt.log"
    assert "STEP_FAILURE" in log.read_text()  # the event log went to the file instead

    verbose = ccat_dt("drive", "-v", env=env)  # nothing new to run: the same status
    assert verbose.returncode == 0


def test_demo_prints_a_line_per_run_and_a_summary(tmp_path: Path) -> None:
    done = ccat_dt("demo", "--root", str(tmp_path / "demo"), "--observations", "1",
                   "--files", "2", "--file-mb", "0.05")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = (done.stdout + done.stderr).splitlines()
    runs = [line for line in lines if line.strip().startswith(("ok ", "FAILED "))]
    assert len(runs) >= 8  # 2 packages x (package, 2 site copies, 2 LTA copies, purges)
    for line in runs:
        fields = line.split()
        assert fields[0] == "ok" and "MB/s" in line and line.endswith(" s")
    assert len(lines) <= len(runs) + 30  # the runs, a summary and the status table
    assert not [line for line in lines if " - DEBUG - " in line or "Traceback" in line]
    assert done.stderr == ""  # nor a sensor's line per tick ("planned 2 package(s)")
    log = (tmp_path / "demo" / "logs" / "ccat-dt.log").read_text()
    assert "STEP_SUCCESS" in log and "planned 2 package(s)" in log  # the tick's line: here


# --- exit status 2: bad input or an unavailable service -------------------------------------


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("ccat-dt: error: ")
    return lines[0]


def test_exit_2_on_bad_input(deploy: Path) -> None:
    line = one_error_line(ccat_dt("--config", str(deploy), "file", "--observation",
                                  "obs-x", "--module", "nosuch/module", "open/a.dat"))
    assert "obs-x" in line and "start it first" in line  # the cause and the next step


@pytest.mark.parametrize("argv", [["drive", "--wait", "-1"], ["demo", "--observations", "0"],
                                  ["demo", "--files", "x"], ["drive", "--wait", "nan"],
                                  ["worker", "--site", "ccat", "--concurrency", "0"]])
def test_exit_2_on_a_number_out_of_range(deploy: Path, tmp_path: Path, argv: list[str]) -> None:
    """Refused by the command line's parser, before anything is made (the demo's root)."""
    done = ccat_dt("--config", str(deploy), *argv, *(
        ["--root", str(tmp_path / "demo")] if argv[0] == "demo" else []))
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"error: argument {argv[-2]}:" in done.stderr
    assert any(why in done.stderr for why in ("below the least allowed", "not a number",
                                              "not a finite number"))
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("hours", ["1e12", "nan", "inf", "0", "-3", "100000"])
def test_exit_2_on_a_staging_expiry_out_of_range(deploy: Path, hours: str) -> None:
    """Refused with the allowed range before OpsDB is asked (it overflowed into exit 3)."""
    done = ccat_dt("--config", str(deploy), "stage", "--location", "ramses/processing",
                   "--observation", "obs-0", "--expires-hours", hours)
    line = one_error_line(done)
    assert "--expires-hours must be more than 0 and at most 87600" in line
    assert done.stdout == ""


@pytest.mark.parametrize("command", [["purge"], ["purge", "--plan"], ["retry"]])
def test_exit_2_when_a_command_names_no_package(deploy: Path, command: list[str]) -> None:
    """Before anything is planned, printed or run."""
    done = ccat_dt("--config", str(deploy), *command, "--package", "obs-nope")
    line = one_error_line(done)
    what = "package or staging request" if command == ["retry"] else "package"
    assert f"unknown {what} 'obs-nope'" in line and "ccat-dt status" in line
    assert done.stdout == ""


@pytest.mark.parametrize("command", [["status"], ["drive"]])
def test_exit_2_on_a_configuration_file_that_is_not_utf8(deploy: Path, tmp_path: Path,
                                                         command: list[str]) -> None:
    """Saved in Latin-1 by an editor: a configuration error naming the file, not "a bug"."""
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(deploy.read_bytes() + "# Universität zu Köln\n".encode("latin-1"))
    line = one_error_line(ccat_dt("--config", str(latin1), *command))
    assert str(latin1) in line and "not UTF-8" in line and "save it as UTF-8" in line


@pytest.mark.parametrize(("site", "said"), [("cologne", "site 'cologne' has no source location"),
                                           ("mars", "unknown site 'mars'")])
def test_exit_2_on_a_token_for_a_site_where_nothing_is_filed(deploy: Path, site: str,
                                                           said: str) -> None:
    """A filing token names the site whose source location it files at: an archive site has
    none. Refused, and no token is made."""
    line = one_error_line(ccat_dt("--config", str(deploy), "token", "create", "--name", "daq",
                                  "--site", site))
    assert said in line and "sites with one: ccat" in line
    assert ccat_dt("--config", str(deploy), "token", "list").stdout == ""


def test_exit_2_when_the_opsdb_is_unreachable(deploy: Path) -> None:
    env = clean_env(CCAT_DT_CONFIG=str(deploy),
                    CCAT_DT_OPSDB_URL="postgresql+psycopg2://ccat@127.0.0.1:1/ops")
    line = one_error_line(ccat_dt("status", env=env))
    assert "OpsDB unavailable" in line and "refused" in line and "reachable" in line


def test_exit_2_when_the_opsdb_is_locked(tmp_path: Path) -> None:
    assert run_cli("init", str(tmp_path / "d")) == 0
    holder = sqlite3.connect(tmp_path / "d" / "opsdb.sqlite", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write
        env = clean_env(CCAT_DT_CONFIG=str(tmp_path / "d" / CONFIG_NAME),
                        CCAT_DT_OPSDB_LOCK_TIMEOUT_S="0.2")
        line = one_error_line(ccat_dt("observation", "start", "o", env=env))
    finally:
        holder.close()
    assert "database is locked" in line and "run the command again" in line


def test_exit_2_when_a_postgres_opsdb_is_locked_by_another_session(tmp_path: Path) -> None:
    """PostgreSQL waits for a lock for ever by default: `status` hung for as long as a psql
    session left `idle in transaction` held it. Now it waits $CCAT_DT_OPSDB_LOCK_TIMEOUT_S, as
    on SQLite, and says what holds it up."""
    from sqlalchemy import create_engine, text

    from tests.faults.pipeline import deployment
    from tests.services import own_database

    databases = own_database("ccat_opsdb")
    url = next(databases)
    try:
        config = deployment(tmp_path / "d", opsdb_url=url)
        holder = create_engine(url)
        with holder.connect() as session:
            session.execute(text("LOCK TABLE physical_copies IN ACCESS EXCLUSIVE MODE"))
            done = ccat_dt("status", timeout=60, env=clean_env(
                CCAT_DT_CONFIG=str(config.path), CCAT_DT_OPSDB_LOCK_TIMEOUT_S="0.5"))
            session.rollback()
        holder.dispose()
    finally:
        next(databases, None)
    line = one_error_line(done)
    assert "OpsDB unavailable" in line and "lock timeout" in line, line
    assert "another session has held a lock" in line and "0.5 s" in line, line


def test_a_postgres_server_that_never_answers_is_given_up_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that takes the connection and says nothing (its host hung on a dead disk, a
    stopped postmaster): libpq waited for ever without a connect_timeout."""
    import socket
    import threading

    from sqlalchemy.exc import OperationalError

    import ccat_dt.opsdb.database as database

    monkeypatch.setattr(database, "PG_CONNECT_TIMEOUT_S", 1)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the backlog; nothing is ever said
    raised: list[BaseException] = []

    def open_it() -> None:
        try:
            database.OpsDB(f"postgresql+psycopg2://ccat@127.0.0.1:{silent.getsockname()[1]}/ops")
        except BaseException as exc:  # noqa: BLE001 - what it raised is the point
            raised.append(exc)

    opener = threading.Thread(target=open_it, daemon=True)
    opener.start()
    opener.join(timeout=60)
    silent.close()
    assert not opener.is_alive(), "still waiting for the server's answer"
    assert [type(e) for e in raised] == [OperationalError] and "timeout" in str(raised[0])


def test_exit_2_when_the_opsdb_is_read_only(tmp_path: Path) -> None:
    """The deployment on a read-only mount (a private mount namespace, as root)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a read-only bind mount")
    root = tmp_path / "d"
    assert run_cli("init", str(root)) == 0
    script = (f'mount --bind "{root}" "{root}" && mount -o remount,ro,bind "{root}" && '
              f'exec "{CCAT_DT}" observation start o')
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                          text=True, timeout=600, check=False,
                          env=clean_env(CCAT_DT_CONFIG=str(root / CONFIG_NAME)))
    if "mount:" in done.stderr:
        pytest.skip(f"cannot make a read-only mount here: {done.stderr.strip()}")
    line = one_error_line(done)
    assert "OpsDB unavailable" in line
    assert "read-only" in line or "readonly" in line


def test_verbose_adds_the_traceback(deploy: Path) -> None:
    env = clean_env(CCAT_DT_CONFIG=str(deploy),
                    CCAT_DT_OPSDB_URL="postgresql+psycopg2://ccat@127.0.0.1:1/ops")
    done = ccat_dt("-v", "status", env=env)
    assert done.returncode == 2
    assert "Traceback" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("ccat-dt: error: OpsDB unavailable")


# --- exit status 3: a bug ------------------------------------------------------------------


def test_exit_3_on_an_internal_error(monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str], deploy: Path) -> None:
    def broken(_: object) -> None:
        raise RuntimeError("something the code did not expect")

    monkeypatch.setattr(cli, "cmd_status", broken)
    assert run_cli("--config", str(deploy), "status") == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("ccat-dt: error: internal error: RuntimeError: something")
    assert run_cli("--config", str(deploy), "status", "-v") == 3
    assert "Traceback" in capsys.readouterr().err


def test_purge_exits_1_while_an_lta_copy_cannot_be_looked_at_and_0_once_it_can(
        tmp_path: Path) -> None:
    """The observatory buffer's tar may go once the LTA copies are looked at on their disks.
    With one archive disk unmounted (its root marker gone), nothing is deleted and the purge
    says so with exit status 1; mounted again, the same command deletes it."""
    root = tmp_path / "d"
    assert run_cli("init", str(root)) == 0
    config_path = root / CONFIG_NAME
    settings = yaml.safe_load(config_path.read_text())
    [ccat] = [site for site in settings["sites"] if site["short_name"] == "ccat"]
    [buffer] = [loc for loc in ccat["locations"] if loc["name"] == "buffer"]
    buffer["retention_hours"] = 1.0  # kept through the drive, due for the purge below
    config_path.write_text(yaml.safe_dump(settings))
    env = clean_env(CCAT_DT_CONFIG=str(config_path))
    write(root / "sites" / "ccat" / "instruments" / "x" / "a.dat", os.urandom(10_000))
    for argv in (("observation", "start", "o"),
                 ("file", "--observation", "o", "--module", MODULE, "x/a.dat"),
                 ("observation", "finish", "o"), ("drive",)):
        done = ccat_dt(*argv, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
    [tar] = list((root / "sites" / "ccat" / "buffer").rglob("*.tar"))
    buffer["retention_hours"] = 0.0
    config_path.write_text(yaml.safe_dump(settings))
    marker = root / "sites" / "cologne" / "lta" / MARKER
    marker.rename(marker.with_name("unmounted"))

    kept = ccat_dt("purge", env=env)

    assert kept.returncode == 1, kept.stdout + kept.stderr
    assert "FAILED" in kept.stdout and "cannot be re-checked" in kept.stdout, kept.stdout
    assert tar.exists()
    marker.with_name("unmounted").rename(marker)
    done = ccat_dt("purge", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not tar.exists()


def test_ctrl_c_stops_a_drive_with_130_and_a_plain_drive_then_finishes(tmp_path: Path) -> None:
    """An operator presses Ctrl-C while `ccat-dt drive` packages a large file: the drive
    says "interrupted" and exits 130, and the interrupted run's line says it was canceled
    (an operator's doing, no failed attempt); a plain drive
    (its work re-attempted after the back-off, here 1 s) finishes the lifecycle: the sources
    purged, the package's tar in both archives, no temporary file left anywhere."""
    import signal
    import time

    root = tmp_path / "d"
    assert run_cli("init", str(root)) == 0
    config_path = root / CONFIG_NAME
    settings = yaml.safe_load(config_path.read_text())
    settings.setdefault("policies", {})["retry_backoff_first_s"] = 1.0
    config_path.write_text(yaml.safe_dump(settings))
    env = clean_env(CCAT_DT_CONFIG=str(config_path))
    source = root / "sites" / "ccat" / "instruments"
    write(source / "o" / "big.dat", os.urandom(300 * 2**20))
    for argv in (["observation", "start", "o"],
                 ["file", "--observation", "o", "--module", MODULE, "o/big.dat"],
                 ["observation", "finish", "o"]):
        assert ccat_dt(*argv, env=env).returncode == 0
    buffer = root / "sites" / "ccat" / "buffer"

    drive = subprocess.Popen([CCAT_DT, "drive", "--wait", "0"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                             text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".part") for p in buffer.rglob("*")):  # the tar is written
        assert drive.poll() is None and time.monotonic() < deadline, drive.communicate()
        time.sleep(0.02)
    os.killpg(drive.pid, signal.SIGINT)  # what the terminal sends to its foreground group
    out, err = drive.communicate(timeout=120)

    assert drive.returncode == 130, out + err
    assert "ccat-dt: interrupted" in err
    assert "Traceback" not in out + err
    # an operator's cancel, no failed attempt of the packaging (never escalated for it)
    assert not [line for line in out.splitlines() if line.startswith("FAILED")], out
    [line] = [line for line in out.splitlines() if line.startswith("CANCELED package")]
    assert "the drive was stopped" in line, out

    done = ccat_dt("drive", "--wait", "60", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (source / "o" / "big.dat").exists()  # purged, so archived twice (below)
    for site in ("cologne", "us"):
        assert len(list((root / "sites" / site / "lta").rglob("*.tar"))) == 1
    assert [p for p in root.rglob("*.part")] == []

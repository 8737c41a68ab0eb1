"""The control host's disk fills or turns read-only under OpsDB (SQLite), the Dagster instance
(DAGSTER_HOME) or the log directory, each a small tmpfs of its own here: the kernel refuses
the writes. Nothing is lost or sent twice; the operator gets one line naming the disk, full or
read-only, and its path (exit 2), or for the log directory one warning while runs go on; once
there is room a plain `ccat-dt drive` converges."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from dagster import DagsterInstance, DagsterRunStatus

import ccat_dt.transports.local as local
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import REPO, archived_everywhere, deployment, observe
from tests.faults.storage_truth import lost_filed_files
from tests.helpers import first_caller, new_instance_home, run_cli

PARTS = ("opsdb", "dagster_home", "logs")  # each its own disk under deploy/control/


class Disk:
    """A tmpfs; `fill` leaves no byte free (another program's file), `free` removes it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def fill(self) -> None:
        free = os.statvfs(self.root)
        try:
            with open(self.root / "filler", "ab") as out:
                out.write(b"\0" * (free.f_bavail * free.f_frsize))
        except OSError:
            pass  # the last bytes did not fit: full either way

    def free(self) -> None:
        (self.root / "filler").unlink(missing_ok=True)

    def read_only(self, on: bool) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if on else 'rw'}", str(self.root)],
                       check=True, capture_output=True)


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[dict[str, Disk]]:
    mounted: dict[str, Disk] = {}
    try:
        for part in PARTS:
            root = tmp_path / "deploy" / "control" / part
            root.mkdir(parents=True)
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs",
                                   str(root)], capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot mount a small tmpfs (needs root): {done.stderr.strip()}")
            mounted[part] = Disk(root)
        yield mounted
    finally:
        for disk in mounted.values():
            subprocess.run(["umount", "-l", str(disk.root)], capture_output=True)


def control_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Config, OpsDB, Path]:
    """The embedded default with OpsDB, DAGSTER_HOME and log_dir on the control disks; the
    data locations elsewhere. An observation filed and finished."""
    control = tmp_path / "deploy" / "control"
    config = deployment(tmp_path / "deploy", opsdb_url="sqlite:///control/opsdb/opsdb.sqlite",
                        log_dir="control/logs",
                        policies={"max_attempts": 3, "retry_backoff_first_s": 0.2})
    home = new_instance_home(control / "dagster_home" / "home")
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("CCAT_DT_OPSDB_URL", raising=False)
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb)
    opsdb.dispose()  # as between two commands: nothing holds the files open
    return config, opsdb, home


def drive_process() -> subprocess.CompletedProcess[str]:
    """A plain `ccat-dt drive` of its own (the environment names the deployment)."""
    return subprocess.run([sys.executable, "-m", "ccat_assets.cli", "drive", "--wait", "30"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def converged(config: Config, opsdb: OpsDB) -> None:
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
    assert lost_filed_files(config, opsdb) == []


@pytest.mark.parametrize("how", ["full", "read-only"])
@pytest.mark.parametrize("part", ["opsdb", "dagster_home"])
def test_a_full_or_read_only_control_disk_stops_drive_with_one_line_naming_it(
        tmp_path: Path, disks: dict[str, Disk], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], part: str, how: str) -> None:
    """OpsDB's or the instance's disk full (SQLite: "disk I/O error", "database or disk is
    full") or read-only when `ccat-dt drive` starts: exit 2 and one line saying that disk is
    full or read-only, with its path. Before: "check that the database is running and
    reachable". Nothing moved; once it has room again a plain drive converges."""
    config, opsdb, home = control_on(tmp_path, monkeypatch)
    disk = disks[part]
    disk.fill() if how == "full" else disk.read_only(True)

    status = run_cli("drive", "--wait", "0")

    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2, err
    assert len(err) == 1 and err[0].startswith("ccat-dt: error: "), err
    assert how in err[0] and str(disk.root) in err[0], err[0]
    assert "running and reachable" not in err[0], err[0]
    assert list(config.resolve_root("sites").rglob("*.tar")) == []  # nothing moved

    disk.free() if how == "full" else disk.read_only(False)
    assert run_cli("drive", "--wait", "30") == 0
    converged(config, opsdb)


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_a_full_or_read_only_log_directory_never_fails_a_run(
        tmp_path: Path, disks: dict[str, Disk], monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str], how: str) -> None:
    """log_dir's disk full or read-only: every run (packaging, copies, purge) succeeds and the
    operator reads one warning naming the log file. Before: full, a traceback per record on
    stderr ("--- Logging error ---", hundreds of KB); read-only, the drive refused to start
    (exit 2), so nothing was transferred or purged."""
    config, opsdb, _ = control_on(tmp_path, monkeypatch)
    disk = disks["logs"]
    disk.fill() if how == "full" else disk.read_only(True)

    done = drive_process()

    assert done.returncode == 0, done.stderr[-3000:]
    assert "Logging error" not in done.stderr and "Traceback" not in done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("ccat-dt: ")]
    assert len(warnings) == 1, warnings
    assert str(config.log_dir / "ccat-dt.log") in warnings[0], warnings[0]
    assert ("No space left" if how == "full" else "Read-only") in warnings[0], warnings[0]
    converged(config, opsdb)


def test_the_instance_disk_filling_mid_copy_stops_drive_and_the_next_drive_converges(
        tmp_path: Path, disks: dict[str, Disk], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """DAGSTER_HOME's disk fills while a copy's bytes land: the run cannot record its events,
    the drive stops with one line naming the full disk (exit 2) and leaves that run STARTED.
    Once there is room, a plain drive closes that run, re-attempts its work (the copy
    already made is found, not sent again) and converges; nothing is escalated."""
    config, opsdb, home = control_on(tmp_path, monkeypatch)
    disk = disks["dagster_home"]
    real = local.LocalTransport._landed

    def landed(self: local.LocalTransport, temporary: Path) -> None:
        if first_caller(tmp_path / "filled"):
            disk.fill()
        real(self, temporary)

    monkeypatch.setattr(local.LocalTransport, "_landed", landed)
    status = run_cli("drive", "--wait", "0")
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2, err
    assert "full" in err[-1] and str(home) in err[-1], err[-1]
    assert "running and reachable" not in err[-1], err[-1]

    disk.free()
    done = drive_process()
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "DIED" in done.stdout  # the run the full disk left STARTED, closed
    assert "escalat" not in done.stdout.lower()
    with DagsterInstance.from_config(str(home)) as instance:
        assert [r.run_id for r in instance.get_runs() if r.status not in
                (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE)] == []
    converged(config, opsdb)


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_transfers_keep_their_lock_and_lose_only_their_output_on_a_bad_log_disk(
        disks: dict[str, Disk], how: str) -> None:
    """rsync and bbcp keep each transfer's command output and the lock of its landing files
    in log_dir. That disk full or read-only: the output is lost (one warning), the transfer
    is not; the lock is still one lock. Before: OSError, the transfer failed."""
    from ccat_dt.transports.base import Endpoint, exclusive_writer
    from ccat_dt.transports.rsync import _Log

    logs = disks["logs"].root
    targets = [Endpoint(PurePosixPath("/archive/obs-0/p.tar"))]
    with exclusive_writer(logs / ".writers", targets):
        pass  # an earlier attempt left its lock file there
    disks["logs"].fill() if how == "full" else disks["logs"].read_only(True)

    _Log(logs / "rsync.log").write("$ rsync ...")  # dropped, not raised
    for lock_dir in (logs / ".writers", logs / "new"):  # the old lock file, and none
        with exclusive_writer(lock_dir, targets) as held:
            pid = os.fork()
            if pid == 0:  # another process's attempt must not get it meanwhile
                try:
                    with exclusive_writer(lock_dir, targets, wait_s=0.2):
                        os._exit(1)
                except Exception:  # noqa: BLE001 - it waited and gave up: the lock holds
                    os._exit(0)
            assert os.waitpid(pid, 0)[1] == 0, f"{lock_dir}: a second writer got the lock"
            assert held >= 0

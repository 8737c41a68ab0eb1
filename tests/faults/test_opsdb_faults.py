"""OpsDB unavailable in the middle of a step: another process holds the SQLite database's
write lock (BEGIN EXCLUSIVE) longer than the step's busy timeout, at the worst moments: the
bytes have landed and are about to be recorded; a file is deleted and its deletion is about to
be recorded."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

import ccat_dt.reaper as reaper
import ccat_dt.transports.local as local
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PhysicalCopy,
)
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import archived_everywhere, deployment, observe, operations, run
from tests.helpers import run_cli

HOLD_S = 1.5  # how long the other process keeps the database locked
BUSY_TIMEOUT_S = 0.3  # the step's wait for the lock (30 s in production): fail fast here
LOCKER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
connection.execute("ROLLBACK")
"""


def short_busy_timeout(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """New OpsDB connections of this process wait BUSY_TIMEOUT_S for a lock, not 30 s."""
    path = config.opsdb_url.removeprefix("sqlite:///")
    real_connect = sqlite3.dbapi2.connect

    def connect(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if str(database) == path:
            kwargs["timeout"] = BUSY_TIMEOUT_S
        return real_connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3.dbapi2, "connect", connect)  # what SQLAlchemy calls


def lock_on_first_landing(config: Config, monkeypatch: pytest.MonkeyPatch
                          ) -> list[subprocess.Popen[str]]:
    """When the first transfer's bytes have landed, another process locks the OpsDB for
    HOLD_S; returns the (soon one) locker process."""
    lockers: list[subprocess.Popen[str]] = []
    real = local.LocalTransport._landed

    def landed(self: local.LocalTransport, temporary: Path) -> None:
        if not lockers:
            lockers.append(_lock(config))
        real(self, temporary)

    monkeypatch.setattr(local.LocalTransport, "_landed", landed)
    return lockers


def lock_after_first_unlink(config: Config, monkeypatch: pytest.MonkeyPatch
                            ) -> list[subprocess.Popen[str]]:
    """When the purge has unlinked its first file, another process locks the OpsDB for
    HOLD_S, before the deletion is recorded; returns the (soon one) locker process."""
    lockers: list[subprocess.Popen[str]] = []
    real = reaper._unlink_local

    def unlink(claim: Any) -> int:
        size = real(claim)
        if not lockers:
            lockers.append(_lock(config))
        return size

    monkeypatch.setattr(reaper, "_unlink_local", unlink)
    return lockers


def _lock(config: Config) -> subprocess.Popen[str]:
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, config.opsdb_url.removeprefix("sqlite:///"), str(HOLD_S)],
        stdout=subprocess.PIPE, text=True)
    assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
    return locker


def _cologne_copies(opsdb: OpsDB) -> list[int]:
    with opsdb.session() as session:
        return [c.id for c in session.scalars(select(PackageCopy))
                if c.location.label == "cologne/buffer"]


def test_opsdb_locked_while_recording_a_copy_the_retry_converges(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    observe(config, opsdb)
    short_busy_timeout(config, monkeypatch)
    lockers = lock_on_first_landing(config, monkeypatch)

    report = run(config, instance, in_process=True)  # the locker is started by the first landing
    # of this process's runs, and the attempts are read in the order they ran

    assert lockers, "the fault was never injected"
    lockers[0].wait(timeout=30)
    assert report.failed == []  # the step's retry found the database back
    transfers = operations(opsdb, OperationType.TRANSFER)
    assert transfers[0][0] == OperationStatus.FAILED  # the attempt that could not record
    # ended by the attempt itself if OpsDB was back by then, else by the retry's claim
    assert (transfers[0][1] or "").startswith(("interrupted: OperationalError", "abandoned: "))
    assert len(_cologne_copies(opsdb)) == 1
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)


def test_opsdb_locked_for_the_only_attempt_fails_cleanly_then_a_reattempt_converges(
        tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's only attempt fails; the re-attempt sensor requests it again after its
    back-off (a new run), which converges: no operator's retry."""
    config = deployment(tmp_path / "deploy", policies={"max_attempts": 1,
                                                       "retry_backoff_first_s": 8})
    opsdb = OpsDB(config.opsdb_url)
    try:
        observe(config, opsdb)
        short_busy_timeout(config, monkeypatch)
        lockers = lock_on_first_landing(config, monkeypatch)

        report = run(config, instance, wait_s=0, in_process=True)  # as above

        assert lockers and [key.split(":")[0] for key in report.failed] == ["site_copy"]
        lockers[0].wait(timeout=30)
        # Cleanly: no copy recorded, the package has not moved on; the verified bytes under
        # the final name are reported as unknown to OpsDB, nothing else is amiss.
        assert _cologne_copies(opsdb) == []
        assert run(config, instance, wait_s=0, in_process=True).launched == []  # back-off not over
        assert_safe(config, opsdb, settled=False, expected_findings=[
            ("dark", "cologne/buffer/obs-0/obs-0_primecam-f280_p00.tar")])

        monkeypatch.undo()
        again = run(config, instance, in_process=True)  # waits out the back-off

        assert again.launched[0].startswith("reattempt:site_copy:")
        assert again.failed == []

        assert len(_cologne_copies(opsdb)) == 1
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()


def test_opsdb_locked_while_recording_a_deletion_the_retry_finishes_it(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is gone but its deletion cannot be recorded, so the purge attempt fails; the
    step's retry within the run (its claim ended with the attempt) finishes the deletion the
    failed attempt left: no failed run, not an hour later, not by a person. Before, the run
    failed and its re-attempt, a new run after the back-off, finished it."""
    observe(config, opsdb)
    short_busy_timeout(config, monkeypatch)
    lockers = lock_after_first_unlink(config, monkeypatch)

    report = run(config, instance, in_process=True)  # the locker is started in this process

    assert lockers, "the fault was never injected"
    lockers[0].wait(timeout=30)
    assert report.failed == []  # the step's retry found the database back
    with opsdb.session() as session:
        [first, *_] = session.scalars(select(Operation).where(
            Operation.operation_type == OperationType.DELETION).order_by(Operation.id)).all()
        copy = session.get_one(PhysicalCopy, first.copy_id)
        path = Path(copy.location.root) / copy.relative_path
        assert copy.status == CopyStatus.DELETED
        # recorded under its own certificate by the retry, not deleted again
        assert first.status == OperationStatus.COMPLETED
        assert "recorded by a later purge" in (first.error or "")
        assert session.scalars(select(Operation).where(
            Operation.copy_id == copy.id,
            Operation.operation_type == OperationType.DELETION)).all() == [first]
    assert not path.exists()
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)


def test_a_purge_run_failed_by_a_lock_then_done_by_its_reattempt_leaves_drive_at_0(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The lock outlasts the purge run's attempts (here its only one): the run fails, and its
    re-attempt in the same `ccat-dt drive` finishes the deletion. Nothing is left to do and
    nobody needs to act: exit 0, the failed run's line kept, the summary saying it healed.
    Before, the drive exited 1 ("a failed run") for a fault that healed itself."""
    config = deployment(tmp_path / "deploy", policies={"max_attempts": 1,
                                                       "retry_backoff_first_s": 0.2})
    opsdb = OpsDB(config.opsdb_url)
    try:
        sources = observe(config, opsdb)
        short_busy_timeout(config, monkeypatch)
        marker = tmp_path / "locked"  # once across the drive's forked runs
        real = reaper._unlink_local

        def unlink(claim: Any) -> int:
            size = real(claim)
            with contextlib.suppress(FileExistsError):
                os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
                _lock(config)
            return size

        monkeypatch.setattr(reaper, "_unlink_local", unlink)

        status = run_cli("--config", str(config.path), "drive", "--wait", "30")

        out = capsys.readouterr().out
        assert marker.exists(), "the fault was never injected"
        assert status == 0, out
        # honest: each failed run's line stays (a re-attempt may meet the lock too)
        failed = [line.split()[1] for line in out.splitlines() if line.startswith("FAILED")]
        assert failed and set(failed) == {"purge"}, out
        assert f"{len(failed)} failed, " in out, out
        assert f"{len(failed)} failed run(s) healed by a later run" in out, out
        assert not [path for path in sources if path.exists()]  # the storage
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)  # verified LTA bytes re-read, every deletion certified
    finally:
        opsdb.dispose()

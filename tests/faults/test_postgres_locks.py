"""A PostgreSQL OpsDB that another session holds locked (a psql left `idle in transaction`
after a `LOCK TABLE` or a `SELECT ... FOR UPDATE`, a VACUUM FULL, a process stopped in the
middle of a transaction), at the worst moments: a purge has unlinked a file and is about to
record it; the drive's first sensor tick.

The lock is real (`LOCK TABLE physical_copies IN ACCESS EXCLUSIVE MODE` in a session of its
own) and held until some statement of the drive or its runs has given up waiting for it
(lock_timeout, SQLSTATE 55P03), or for LOCK_CAP_S at most. PostgreSQL waits for a lock for
ever by default: before, every statement waited for the holder, so a holder that never ends
hung the drive, its runs and the daemon's ticks with nobody told (the cap here ends the
test). Now a wait is bounded as on SQLite (CCAT_DT_OPSDB_LOCK_TIMEOUT_S, 30 s), the step or
tick fails, is retried and the drive converges once the lock is gone, with nobody's retry.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from sqlalchemy import Engine, event

import ccat_dt.reaper as reaper
from ccat_dt.opsdb.database import LOCK_TIMEOUT_ENV, OpsDB
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import archived_everywhere, deployment, observe, run
from tests.services import own_database

LOCK_CAP_S = 60.0  # the longest the lock is held if no wait for it ever gives up
LOCKER = """
import os, sys, time
import psycopg2
url, gave_up, released, cap = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
connection = psycopg2.connect(url)
cursor = connection.cursor()
cursor.execute("LOCK TABLE physical_copies IN ACCESS EXCLUSIVE MODE")
print("locked", flush=True)
deadline = time.monotonic() + cap
while not os.path.exists(gave_up) and time.monotonic() < deadline:
    time.sleep(0.02)
connection.rollback()
with open(released, "w") as out:
    out.write("a wait gave up" if os.path.exists(gave_up) else "held to the cap")
"""


@pytest.fixture
def opsdb_database() -> Iterator[str]:
    yield from own_database("ccat_opsdb")


class Lock:
    """The other session's lock, and what ended it."""

    def __init__(self, url: str, directory: Path) -> None:
        self.url = url
        self.gave_up = directory / "gave-up"  # a statement's lock wait timed out: its pid
        self.released = directory / "released"

    def take(self) -> None:
        """Start the holder and return once it holds the lock."""
        holder = subprocess.Popen([sys.executable, "-c", LOCKER, self.url, str(self.gave_up),
                                   str(self.released), str(LOCK_CAP_S)],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"

    def watch(self, context: Any) -> None:
        """SQLAlchemy's handle_error, in this process and the runs it forks."""
        if getattr(context.original_exception, "pgcode", None) == "55P03":  # lock_not_available
            with contextlib.suppress(FileExistsError):
                fd = os.open(self.gave_up, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)

    def outcome(self) -> str:
        """Why the holder let go (it does within its cap)."""
        deadline = time.monotonic() + LOCK_CAP_S + 30
        while time.monotonic() < deadline:
            if self.released.exists() and (said := self.released.read_text()):
                return said
            time.sleep(0.1)
        return "never released"


@pytest.mark.parametrize("moment", ["purge recording a deletion", "sensor tick"])
def test_a_postgres_opsdb_locked_by_another_session_heals_by_itself(
        moment: str, opsdb_database: str, instance: DagsterInstance, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "1")
    config = deployment(tmp_path / "deploy", opsdb_url=opsdb_database,
                        policies={"max_attempts": 3, "retry_backoff_first_s": 0.2})
    opsdb = OpsDB(config.opsdb_url)
    sources = observe(config, opsdb)
    lock = Lock(opsdb_database, tmp_path)
    if moment == "sensor tick":
        lock.take()
    else:  # after the purge's first unlink, before its record (once across forked runs)
        taken = tmp_path / "taken"
        real = reaper._unlink_local

        def unlink(claim: Any) -> int:
            size = real(claim)
            with contextlib.suppress(FileExistsError):
                os.close(os.open(taken, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
                lock.take()
            return size

        monkeypatch.setattr(reaper, "_unlink_local", unlink)
    event.listen(Engine, "handle_error", lock.watch)
    try:
        report = run(config, instance, wait_s=30)
    finally:
        event.remove(Engine, "handle_error", lock.watch)

    # bounded: a statement gave up waiting while the lock was held (before: none ever did,
    # the holder let go at its cap and only then did anything move)
    assert lock.outcome() == "a wait gave up"
    if moment == "sensor tick":  # the drive's own tick, ticked again after its back-off
        assert lock.gave_up.read_text() == str(os.getpid())
    assert report.sensor_failures == {}, report.sensor_failures
    assert not report.failed or any(k.startswith("reattempt:") for k in report.launched), report
    assert not instance.get_runs(RunsFilter(statuses=[
        DagsterRunStatus.STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.QUEUED]))
    assert not [path for path in sources if path.exists()]  # purged, read on the storage
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)  # every deletion certified, verified LTA bytes re-read
    opsdb.dispose()

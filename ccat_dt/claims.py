"""One transfer of a package to a destination location at a time, across runs and processes.

The claim is the transfer (or archive) operation itself while it is IN_PROGRESS: `place()`
locks the package rows of its batch (`lock_package`, in name order: SQLite's write lock,
PostgreSQL's row locks), then looks for an operation in flight on the same (package,
destination) and only if there is none inserts its own, in that one transaction, committed
before any byte moves. Whoever comes second sees the first one's claim: it waits for it (its
own package) or leaves the package out of its batch (a companion). No in-process lock: every
process (the drive's forked runs, a UI Materialize, `dagster asset materialize`, a Celery
worker) shares OpsDB.

A claim whose process died must not block: it is live only while
- its lease runs (`lease_until`, renewed every RENEW_EVERY by the transferring process while
  the bytes move; a process killed or cut off from OpsDB stops renewing it), and
- on the host that holds it (same host name and pid namespace), its process still runs: a
  process killed -9 frees its claims at once, not a lease later; and in the process that
  holds it, a place() still has it (`track`): an attempt that ended without ending its claim
  (OpsDB locked when it recorded) does not block the step's retry in the same process.
Another host writes its lease by its own clock: it counts as run out only CLOCK_SKEW after its
end by ours, so a clock off by minutes never takes a live claim over. A deletion's claim on
this host is judged by its process first, so a clock stepped forward does not either.
A stale claim is closed (FAILED, saying why) by the next process that finds it, under the same
lock, and that process goes ahead. A process cut off from OpsDB longer than LEASE whose
transfer still runs may overlap the next one; the transports' temporary-file claim (local:
flock) and the record's "same bytes already recorded" check keep that safe.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from functools import cache
from types import TracebackType

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import Operation, OperationStatus, OperationType, _aware, utcnow

LEASE = timedelta(minutes=5)
RENEW_EVERY = LEASE / 5
# A deletion is one unlink, or one `rm` over ssh (at most remote.SHORT_TIMEOUT_S): its claim is
# not renewed, and one older than this belongs to a process that died.
DELETION_LEASE = timedelta(hours=1)
MOVES = (OperationType.TRANSFER, OperationType.ARCHIVE)
# Another host wrote its lease by its own clock, which may be off from ours (NTP broken or
# stepping): its lease counts as run out only this long after its end by our clock. A claim
# on this host is judged by its process first.
CLOCK_SKEW = timedelta(minutes=30)

log = logging.getLogger(__name__)


_tracked: set[int] = set()  # the claims a place() of this process holds now
_tracked_lock = threading.Lock()


def track(operation_ids: Collection[int]) -> None:
    with _tracked_lock:
        _tracked.update(operation_ids)


def untrack(operation_ids: Collection[int]) -> None:
    with _tracked_lock:
        _tracked.difference_update(operation_ids)


@cache
def this_host() -> str:
    """The host name and pid namespace: where a claim's pid means this process table."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()} {namespace}".strip()[:200]


def hold(operation: Operation, now: datetime | None = None, lease: timedelta = LEASE) -> None:
    """Make a new operation this process's claim, for `lease` unless renewed."""
    operation.owner_host, operation.owner_pid = this_host(), os.getpid()
    operation.lease_until = _aware(now or utcnow()) + lease


def stale(operation: Operation, now: datetime) -> str | None:
    """Why the operation in flight no longer holds its claim, or None while it does."""
    if operation.lease_until is None:
        return "no lease (started before claims were kept)"
    if _ran_out(operation, now):
        return (f"its lease ran out at {_aware(operation.lease_until).isoformat()} "
                f"(process {operation.owner_pid} on {operation.owner_host} stopped renewing it)")
    if operation.owner_host != this_host() or operation.owner_pid is None:
        return None
    if operation.owner_pid == os.getpid():
        with _tracked_lock:
            if operation.id in _tracked:
                return None
        return f"its attempt in this process ({operation.owner_pid}) ended without ending it"
    if not _running(operation.owner_pid):
        return f"its process {operation.owner_pid} on this host is gone"
    return None


def abandoned_deletion(operation: Operation, now: datetime) -> str | None:
    """Why a deletion IN_PROGRESS can no longer be going on (its process is gone, its attempt
    ended, its lease ran out), or None while it may be."""
    if operation.lease_until is None:  # claimed before deletions recorded their process
        if _aware(operation.started_at) <= _aware(now) - DELETION_LEASE:
            return f"its process stopped ({DELETION_LEASE} ago or more)"
        return None
    here = operation.owner_host == this_host() and operation.owner_pid not in (None, os.getpid())
    if here and _running(operation.owner_pid or 0):
        return None  # its process runs here: judged by that, not by a clock that may step
    if _ran_out(operation, now):  # never renewed: longer than any deletion
        return (f"its lease ran out at {_aware(operation.lease_until).isoformat()} (process "
                f"{operation.owner_pid} on {_host(operation)})")
    return stale(operation, now)


def _ran_out(operation: Operation, now: datetime) -> bool:
    assert operation.lease_until is not None
    end = _aware(operation.lease_until)
    if operation.owner_host not in (None, this_host()):
        end += CLOCK_SKEW
    return end <= _aware(now)


def holder(operation: Operation) -> str:
    """Who holds a claim, in words."""
    if operation.owner_pid is None:
        return "a process that recorded no identity"
    until = (f", its lease until {_aware(operation.lease_until):%Y-%m-%d %H:%M:%S} UTC"
             if operation.lease_until is not None else "")
    if until and operation.owner_host not in (None, this_host()):
        until += f" by its host's clock (taken over {CLOCK_SKEW} after that by ours)"
    return f"process {operation.owner_pid} on {_host(operation)}{until}"


def _host(operation: Operation) -> str:
    """The claim's host name, without the pid namespace."""
    return (operation.owner_host or "an unknown host").split()[0]


def process_running(pid: int) -> bool:
    """Whether process `pid` of this host (and pid namespace) runs (a zombie does not)."""
    return _running(pid)


def _running(pid: int) -> bool:
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")  # a zombie is dead, only not yet reaped
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_claim(session: Session, package_id: int, destination_id: int,
               now: datetime | None = None, *, kinds: Collection[OperationType] = MOVES,
               reason: str | None = None) -> Operation | None:
    """The live claim on (package, destination), closing the stale ones found on the way.
    Call it with the package row locked, then add yours in the same transaction. `kinds` and
    `reason` narrow it (a staging's claim is on the package for one request)."""
    now = now or utcnow()
    found = None
    query = select(Operation).where(
        Operation.package_id == package_id, Operation.destination_location_id == destination_id,
        Operation.operation_type.in_(kinds), Operation.status == OperationStatus.IN_PROGRESS)
    if reason is not None:
        query = query.where(Operation.reason == reason)
    for operation in session.scalars(query.order_by(Operation.id)):
        why = stale(operation, now)
        if why is None:
            found = found or operation
            continue
        operation.status, operation.finished_at = OperationStatus.FAILED, utcnow()
        operation.error = f"abandoned: {why}; the claim was taken over"
    return found


def wait_until_ended(opsdb: OpsDB, operation_id: int, poll_s: float = 2.0) -> None:
    """Until operation `operation_id` is no longer a live claim (finished, or stale)."""
    pause = 0.05
    while True:
        with opsdb.session() as session:
            operation = session.get_one(Operation, operation_id)
            if (operation.status != OperationStatus.IN_PROGRESS
                    or stale(operation, utcnow()) is not None):
                return
        time.sleep(pause)
        pause = min(pause * 2, poll_s)


def release(opsdb: OpsDB, operation_ids: Collection[int], why: str) -> None:
    """End claims whose transfer was interrupted in a process that lives on (best effort: if
    OpsDB is away, the lease runs out instead)."""
    if not operation_ids:
        return
    try:
        with opsdb.session() as session:
            session.execute(update(Operation).where(
                Operation.id.in_(list(operation_ids)),
                Operation.status == OperationStatus.IN_PROGRESS)
                .values(status=OperationStatus.FAILED, finished_at=utcnow(), error=why[:2000])
                .execution_options(synchronize_session=False))
    except SQLAlchemyError as exc:
        log.warning("cannot end the claims of operations %s: %s", list(operation_ids), exc)


class Lease:
    """Renews the claims of `operation_ids` every RENEW_EVERY while the bytes move."""

    def __init__(self, opsdb: OpsDB, operation_ids: Collection[int]) -> None:
        self._opsdb, self._ids = opsdb, list(operation_ids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="claim-lease", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_EVERY.total_seconds()):
            try:
                with self._opsdb.session() as session:
                    session.execute(update(Operation).where(
                        Operation.id.in_(self._ids),
                        Operation.status == OperationStatus.IN_PROGRESS)
                        .values(lease_until=utcnow() + LEASE)
                        .execution_options(synchronize_session=False))
            except SQLAlchemyError as exc:  # OpsDB away: the next renewal tries again
                log.warning("cannot renew the claim of operations %s: %s", self._ids, exc)


@contextmanager
def holding(opsdb: OpsDB, operation_ids: Collection[int]) -> Iterator[None]:
    """This process's claims (`hold`) while its work runs: tracked, their lease renewed, so that
    another process (`audit`) sees the work in flight, not files nobody is writing."""
    track(operation_ids)
    try:
        with Lease(opsdb, operation_ids):
            yield
    finally:
        untrack(operation_ids)

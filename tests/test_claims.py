"""One transfer of a package to a destination at a time, whatever starts it (ccat_dt/claims.py):
two processes placing one package at one place move its bytes once and both end with the
verified copy; a batch leaves out a package another process is moving there; a claim whose
process was killed, or whose transfer was interrupted, does not block the next attempt. On
SQLite and PostgreSQL; the other process is an OS process of its own doing what the placement
IO manager does."""

from __future__ import annotations

import copy
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

import ccat_dt.replicas as replicas
from ccat_dt import claims
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.defaults import EMBEDDED_DEFAULT
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    RawDataPackage,
    _aware,
    utcnow,
)
from ccat_dt.packages import build, get_package, plan_packages
from ccat_dt.topology import primary_location
from tests.faults.pipeline import child_argv, deployment, finish, spawn, wait_for
from tests.helpers import observe

BUFFER = LocationType.BUFFER


@pytest.fixture(params=["sqlite", "postgres"])
def placed_from(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Config, OpsDB]]:
    """Two packages (one observation, two modules) built at the observatory, going to cologne
    on a route that batches them (no other archive: both go there first)."""
    overrides: dict[str, object] = {
        "sites": [s for s in copy.deepcopy(EMBEDDED_DEFAULT["sites"])  # type: ignore[attr-defined]
                  if s["short_name"] != "us"],
        "routes": [{"origin": "ccat", "destination": "cologne", "transport": "local",
                    "batch_bytes": 10**9},
                   {"origin": "cologne", "destination": "ramses", "transport": "local"}]}
    if request.param == "postgres":
        overrides["opsdb_url"] = request.getfixturevalue("postgres_url")
    config = deployment(tmp_path / "deploy", **overrides)
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1, files=2)
    with opsdb.session() as session:
        names = [p.name for p in plan_packages(session, config)]
    for name in names:
        build(opsdb, config, name)
    yield config, opsdb
    opsdb.dispose()


def _names(opsdb: OpsDB) -> list[str]:
    with opsdb.session() as session:
        return list(session.scalars(select(RawDataPackage.name).order_by(RawDataPackage.id)))


def _at_cologne(config: Config, opsdb: OpsDB, name: str) -> Path:
    with opsdb.session() as session:
        package = get_package(session, name)
        root = primary_location(session, "cologne", BUFFER).root
        return config.resolve_root(root) / package.observation.name / f"{name}.tar"


def _intact(opsdb: OpsDB, path: Path, name: str) -> None:
    """The file at `path` holds the package's bytes (read now) and is the one recorded."""
    with opsdb.session() as session:
        package = get_package(session, name)
        [recorded] = [c for c in package.copies if c.location.site.short_name == "cologne"
                      and c.is_verified]
        expected, inode, mtime_ns = package.checksum, recorded.inode, recorded.mtime_ns
    assert hash_file(path)[0] == expected
    info = path.stat()
    assert (info.st_ino, info.st_mtime_ns) == (inode, mtime_ns)  # not written again since


def _moves(opsdb: OpsDB, name: str) -> list[Operation]:
    with opsdb.session() as session:
        return list(session.scalars(select(Operation).where(
            Operation.package_id == get_package(session, name).id,
            Operation.operation_type == OperationType.TRANSFER).order_by(Operation.id)))


def test_two_processes_placing_one_package_at_one_place_move_it_once(
        placed_from: tuple[Config, OpsDB], tmp_path: Path) -> None:
    config, opsdb = placed_from
    name = _names(opsdb)[0]

    # both past the "is it there already?" check before either claims the transfer
    racers = [spawn(child_argv(config, "place", name, "cologne", "buffer", at="claim",
                               barrier=str(tmp_path / "barrier"), parties=2)) for _ in range(2)]
    outcomes = [finish(process) for process in racers]

    assert [o.returncode for o in outcomes] == [0, 0], [o.stderr[-2000:] for o in outcomes]
    assert len({o.result["result"] for o in outcomes}) == 1  # both end with the one copy
    _intact(opsdb, _at_cologne(config, opsdb, name), name)
    moved = [(m.status, m.bytes is not None) for m in _moves(opsdb, name)]
    # one transfer, of this package alone or with its batch companion, moved the bytes
    assert moved == [(OperationStatus.COMPLETED, True)]


def test_a_batch_leaves_out_a_package_another_process_is_moving_there(
        placed_from: tuple[Config, OpsDB], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config, opsdb = placed_from
    first, second = _names(opsdb)
    with opsdb.session() as session:  # an earlier attempt at `first` failed: the run of
        package = get_package(session, first)  # `second` does not take it along
        session.add(Operation(
            operation_type=OperationType.TRANSFER, status=OperationStatus.FAILED,
            package=package, destination_location_id=primary_location(session, "cologne",
                                                                      BUFFER).id,
            error="earlier attempt failed", finished_at=utcnow()))
    marker = tmp_path / "holding"
    holder = None
    lock = replicas.lock_package

    def other_run_starts_meanwhile(session: object, package: str) -> None:
        # `first`'s run has picked `second` as a batch companion; `second`'s own run starts
        # its transfer before the batch is claimed, and holds there, mid-write
        nonlocal holder
        if holder is None:
            holder = spawn(child_argv(config, "place", second, "cologne", "buffer",
                                      kill="hold-mid-write", marker=str(marker)))
            wait_for(marker, holder)
        lock(session, package)  # type: ignore[arg-type]

    monkeypatch.setattr(replicas, "lock_package", other_run_starts_meanwhile)
    try:
        placement = replicas.plan_placement(opsdb, config, first, "cologne", BUFFER)
        assert placement.source.site == "ccat"
        placed = replicas.place(opsdb, config, placement, BUFFER, run_id="first-run")
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    monkeypatch.undo()

    assert holder is not None
    assert placed.transport == "local" and placed.batched_with == ()
    _intact(opsdb, _at_cologne(config, opsdb, first), first)
    with opsdb.session() as session:
        mine = session.scalars(select(Operation.package_id).where(
            Operation.run_id == "first-run",
            Operation.operation_type == OperationType.TRANSFER)).all()
        assert mine == [get_package(session, first).id]
    assert not _at_cologne(config, opsdb, second).exists()  # the holder never renamed it
    [held] = _moves(opsdb, second)
    assert held.status == OperationStatus.IN_PROGRESS  # killed: it never ended it

    # the killed holder's claim does not block `second`'s next run
    again = replicas.place(opsdb, config, replicas.plan_placement(
        opsdb, config, second, "cologne", BUFFER), BUFFER)

    assert again.transport == "local" and again.batched_with == ()
    _intact(opsdb, _at_cologne(config, opsdb, second), second)
    abandoned, done = _moves(opsdb, second)
    assert abandoned.status == OperationStatus.FAILED and "abandoned" in (abandoned.error or "")
    assert done.status == OperationStatus.COMPLETED


def test_a_claim_of_a_killed_process_does_not_block_the_next_attempt(
        placed_from: tuple[Config, OpsDB]) -> None:
    config, opsdb = placed_from
    name = _names(opsdb)[0]

    dead = finish(spawn(child_argv(config, "place", name, "cologne", "buffer",
                                   kill="mid-write")))

    assert dead.returncode == -signal.SIGKILL, dead.stderr[-2000:]
    [claim] = _moves(opsdb, name)
    assert claim.status == OperationStatus.IN_PROGRESS
    # its lease has not run out: its process being gone is what frees it
    assert claim.lease_until is not None and _aware(claim.lease_until) > utcnow()

    placed = replicas.place(opsdb, config, replicas.plan_placement(
        opsdb, config, name, "cologne", BUFFER), BUFFER)

    assert placed.transport == "local"
    _intact(opsdb, _at_cologne(config, opsdb, name), name)
    abandoned, done = _moves(opsdb, name)
    assert abandoned.status == OperationStatus.FAILED
    assert f"process {claim.owner_pid} on this host is gone" in (abandoned.error or "")
    assert done.status == OperationStatus.COMPLETED and done.copy_id is not None


def test_a_transfer_interrupted_in_a_process_that_lives_on_ends_its_claim(
        placed_from: tuple[Config, OpsDB], monkeypatch: pytest.MonkeyPatch) -> None:
    """A run terminated mid-transfer in a worker process that stays (Celery): its claim ends
    there, not a lease later."""
    config, opsdb = placed_from
    name = _names(opsdb)[0]

    def terminated(*_: object) -> None:
        raise KeyboardInterrupt("the run was terminated")

    monkeypatch.setattr(replicas, "_transfer", terminated)
    with pytest.raises(KeyboardInterrupt):
        replicas.place(opsdb, config, replicas.plan_placement(
            opsdb, config, name, "cologne", BUFFER), BUFFER)
    monkeypatch.undo()

    ended = _moves(opsdb, name)
    assert [m.status for m in ended] == [OperationStatus.FAILED] * len(ended) and ended
    assert all("interrupted: KeyboardInterrupt" in (m.error or "") for m in ended)
    assert not _at_cologne(config, opsdb, name).exists()
    placed = replicas.place(opsdb, config, replicas.plan_placement(
        opsdb, config, name, "cologne", BUFFER), BUFFER)
    assert placed.transport == "local"
    _intact(opsdb, _at_cologne(config, opsdb, name), name)


def test_a_claim_is_live_while_its_lease_runs_and_its_holder_on_this_host_lives() -> None:
    now = utcnow()
    here = Operation(id=10**9, status=OperationStatus.IN_PROGRESS)
    claims.hold(here, now)
    claims.track([here.id])
    try:
        assert claims.stale(here, now) is None  # a place() of this very process has it
        assert "lease ran out" in (claims.stale(here, now + claims.LEASE) or "")
    finally:
        claims.untrack([here.id])
    # its place() ended without ending it (OpsDB away): the step's retry here goes ahead
    assert "ended without ending it" in (claims.stale(here, now) or "")
    finished = _a_finished_pid()
    elsewhere = Operation(status=OperationStatus.IN_PROGRESS, owner_host="another-host",
                          owner_pid=finished, lease_until=now + claims.LEASE)
    assert claims.stale(elsewhere, now) is None  # its pid means nothing here: the lease does
    gone = Operation(status=OperationStatus.IN_PROGRESS, owner_host=claims.this_host(),
                     owner_pid=finished, lease_until=now + claims.LEASE)
    assert "is gone" in (claims.stale(gone, now) or "")
    assert "no lease" in (claims.stale(Operation(status=OperationStatus.IN_PROGRESS), now) or "")


def _a_finished_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid



def test_a_transfer_in_flight_renews_its_lease(opsdb: OpsDB,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """What keeps a claim on another host live while its bytes move, and only then."""
    with opsdb.session() as session:
        operation = Operation(operation_type=OperationType.TRANSFER)
        claims.hold(operation, utcnow() - claims.LEASE)  # its lease ran out just now
        session.add(operation)
    monkeypatch.setattr(claims, "RENEW_EVERY", timedelta(milliseconds=10))

    def lease_until() -> datetime:
        with opsdb.session() as session:
            until = session.get_one(Operation, operation.id).lease_until
            assert until is not None
            return _aware(until)

    with claims.Lease(opsdb, [operation.id]):
        deadline = time.monotonic() + 30
        while lease_until() <= utcnow():
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.01)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_two_planners_at_once_plan_each_file_once_and_neither_fails(
        request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        backend: str) -> None:
    """A daemon's package sensor and a drive's plan the same finished observation at the same
    moment: the second to commit finds the first one's packages there (the unique index) and
    plans nothing, instead of failing its tick (which `drive` reports, and exits 1 for)."""
    import ccat_dt.packages as packages

    overrides = ({"opsdb_url": request.getfixturevalue("postgres_url")}
                 if backend == "postgres" else {})
    config = deployment(tmp_path / "deploy", **overrides)
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1, files=2)
    real = packages.split_into_packages
    others: list[list[str]] = []

    def the_other_planner_first(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not others:  # after this planner read the unpackaged files, before it writes
            others.append([])
            others[0] = packages.plan_new_packages(opsdb, config)
        return real(*args, **kwargs)

    monkeypatch.setattr(packages, "split_into_packages", the_other_planner_first)
    mine = packages.plan_new_packages(opsdb, config)

    assert mine == [] and len(others[0]) == 2  # one module each, planned by the other only
    assert sorted(_names(opsdb)) == sorted(others[0])
    with opsdb.session() as session:
        packaged = session.scalars(select(RawDataPackage)).all()
        assert sum(len(p.files) for p in packaged) == 4  # every file in exactly one package
    opsdb.dispose()

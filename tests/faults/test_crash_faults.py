"""A worker SIGKILLed in the middle of a step (packaging, a transfer, a deletion), then the
pipeline run again. Each step runs in a child process exactly as the asset would run it; the
kill is a real SIGKILL at a precise point, so nothing cleans up after it."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from sqlalchemy import select

import ccat_dt.reaper as reaper
from ccat_dt import claims
from ccat_dt.config import Config
from ccat_dt.diagnosis import diagnose
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PackageState,
    PhysicalCopy,
    RawDataPackage,
    _aware,
    utcnow,
)
from ccat_dt.retention import Action
from ccat_dt.retry import abandoned_deletions, stalled_work
from ccat_dt.topology import get_location
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    archived_everywhere,
    child,
    child_argv,
    finish,
    observe,
    operations,
    package_state,
    plan,
    run,
    spawn,
    wait_for,
)

TAR = "obs-0/obs-0_primecam-f280_p00.tar"
PART = "obs-0/.obs-0_primecam-f280_p00.tar.part"


def _location(config: Config, site: str, name: str) -> Path:
    return config.resolve_root(f"sites/{site}/{name}")


def test_killed_mid_tar_leaves_only_a_temporary_file_and_a_rerun_converges(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, tmp_path: Path) -> None:
    observe(config, opsdb, files=4)
    package = plan(config, opsdb, instance)
    marker = tmp_path / "half-way"
    process = spawn(child_argv(config, "build", package, kill="mid-tar", marker=str(marker)))
    wait_for(marker, process)  # two of four members are in the tar
    os.kill(process.pid, signal.SIGKILL)
    assert finish(process).killed

    buffer = _location(config, "ccat", "buffer")
    assert (buffer / PART).stat().st_size > 0 and not (buffer / TAR).exists()
    assert package_state(opsdb, package) == PackageState.PLANNED  # nothing recorded as built
    assert_safe(config, opsdb, allow_partial=True, settled=False,
                expected_findings=[("partial", PART)])

    assert run(config, instance).failed == []

    assert not (buffer / PART).exists()
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)


def test_run_killed_after_the_tar_is_in_place_a_plain_drive_finishes_it(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    """The drive dies with its packaging run (tar renamed into place, OpsDB not told). The
    next plain drive marks the dead run failed and the re-attempt sensor requests the work
    again after its back-off, with a new run key: no operator needed."""
    observe(config, opsdb)
    dead = child(config, "drive", kill="package-before-record", home=instance.root_directory)
    assert dead.killed, dead.stderr[-2000:]

    [package] = _names(opsdb)
    buffer = _location(config, "ccat", "buffer")
    assert (buffer / TAR).is_file()  # complete, verified bytes, but OpsDB does not know them
    assert package_state(opsdb, package) == PackageState.PLANNED
    [run_record] = instance.get_runs(RunsFilter(tags={"dagster/partition": package}))
    assert run_record.status == DagsterRunStatus.STARTED  # its process is gone
    assert_safe(config, opsdb, settled=False, expected_findings=[("dark", TAR)])
    [stalled] = stalled_work(opsdb, config)
    assert (stalled.stage, stalled.package) == ("packaging", package)
    assert "never finished" in stalled.reason

    report = run(config, instance)

    assert report.dead_runs == [f"package:{package}"]
    assert report.launched[0].startswith(f"reattempt:packaging:{package}:")
    assert report.failed == []
    ended = instance.get_run_by_id(run_record.run_id)
    assert ended is not None and ended.status == DagsterRunStatus.FAILURE
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)


@pytest.mark.parametrize("kill", ["mid-write", "before-record"])
def test_killed_during_a_transfer_then_rerun_converges_without_duplicates(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, kill: str) -> None:
    observe(config, opsdb)
    package = plan(config, opsdb, instance)
    built = child(config, "build", package)
    assert built.returncode == 0, built.stderr[-2000:]

    dead = child(config, "place", package, "cologne", "buffer", kill=kill)

    assert dead.killed, dead.stderr[-2000:]
    cologne = _location(config, "cologne", "buffer")
    if kill == "mid-write":
        assert (cologne / PART).is_file() and not (cologne / TAR).exists()
        assert_safe(config, opsdb, allow_partial=True, settled=False,
                    expected_findings=[("partial", PART)])
    else:
        assert (cologne / TAR).is_file() and not (cologne / PART).exists()
        assert_safe(config, opsdb, settled=False, expected_findings=[("dark", TAR)])
    [(status, _)] = operations(opsdb, OperationType.TRANSFER, package)
    assert status == OperationStatus.IN_PROGRESS  # the dead process never ended it

    assert run(config, instance).failed == []

    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
    with opsdb.session() as session:  # one copy ever recorded at cologne's buffer
        rows = session.scalars(select(PackageCopy).where(
            PackageCopy.location_id == get_location(session, "cologne", "buffer").id)).all()
        assert len(rows) == 1


def _names(opsdb: OpsDB) -> list[str]:
    with opsdb.session() as session:
        return list(session.scalars(select(RawDataPackage.name)))


def _archive_without_purging(config: Config, opsdb: OpsDB, instance: DagsterInstance,
                             monkeypatch: pytest.MonkeyPatch) -> str:
    """Drive to the end with every deletion held back, so a purge child has all to do."""
    observe(config, opsdb)
    monkeypatch.setattr(reaper, "_claim", lambda opsdb, config, package_id, planned, *rest:
                        replace(planned, action=Action.KEEP, reason="held back by the test"))
    assert run(config, instance).failed == []
    monkeypatch.undo()
    [package] = _names(opsdb)
    assert package_state(opsdb, package) == PackageState.ARCHIVED
    return package


@pytest.mark.parametrize(("kill", "nth", "claimed_on"), [
    ("after-certificate", 4, "this host"), ("after-unlink", 4, "this host"),
    ("after-certificate", 6, "this host"), ("after-certificate", 6, "another host")])
def test_killed_between_certificate_and_record_the_deletion_is_finished_later(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch, kill: str, nth: int, claimed_on: str) -> None:
    """Killed after the n-th of 6 deletions (3 buffer copies, then 3 raw files) committed its
    certificate. Killed at the 4th, the 5th and 6th are still due: the next purge of the
    package finishes the dead claim too. Killed at the last, no planned purge of the package
    is due again: the purge sensor asks for one that finishes the abandoned deletion. A claim
    whose process is gone from this host is finished at once; one held on another host (whose
    process cannot be looked at) once its lease ran out. No operator needed."""
    package = _archive_without_purging(config, opsdb, instance, monkeypatch)

    dead = child(config, "purge", package, kill=kill, nth=nth)

    assert dead.killed, dead.stderr[-2000:]
    with opsdb.session() as session:
        [stuck] = session.scalars(select(PhysicalCopy).where(
            PhysicalCopy.status == CopyStatus.DELETION_IN_PROGRESS)).all()
        stuck_id, stuck_path = stuck.id, Path(stuck.location.root) / stuck.relative_path
        [claim] = session.scalars(select(Operation).where(
            Operation.copy_id == stuck_id,
            Operation.operation_type == OperationType.DELETION)).all()
        assert claim.status == OperationStatus.IN_PROGRESS and claim.evidence  # certified
        assert claim.owner_pid is not None and claim.lease_until is not None
        owner, lease_until = claim.owner_pid, _aware(claim.lease_until)
        if claimed_on == "another host":
            claim.owner_host = "archive-node-2"
    assert stuck_path.exists() == (kill == "after-certificate")
    assert_safe(config, opsdb, settled=False)  # a half-done deletion breaks no invariant

    if claimed_on == "another host":  # its process may be deleting: it stays for its lease
        assert run(config, instance).failed == []
        assert _status(opsdb, stuck_id) == CopyStatus.DELETION_IN_PROGRESS
        assert abandoned_deletions(opsdb) == []
        with opsdb.session() as session:  # `why` says who holds it, till when
            purge = {s.stage: s for s in diagnose(session, config, package, utcnow())}["purge"]
        assert f"held by process {owner} on archive-node-2, its lease until" in purge.detail
        # Its lease, written by that host's clock, counts as run out only CLOCK_SKEW later.
        assert abandoned_deletions(opsdb, lease_until + timedelta(seconds=1)) == []
        [abandoned] = abandoned_deletions(opsdb, lease_until + claims.CLOCK_SKEW
                                          + timedelta(seconds=1))
        assert abandoned.copy_id == stuck_id
        with opsdb.session() as session:  # an hour and a half later ...
            session.get_one(Operation, claim.id).lease_until = utcnow() - claims.CLOCK_SKEW
    launched = run(config, instance).launched
    if nth == 6:  # ... the sensor finishes the abandoned deletion
        assert [key.split(":")[0] for key in launched] == ["purge-unfinished"]

    assert not stuck_path.exists()
    assert _status(opsdb, stuck_id) == CopyStatus.DELETED
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)  # including a certificate for the finished deletion
    with opsdb.session() as session:
        ended = session.scalars(select(Operation).where(
            Operation.copy_id == stuck_id, Operation.operation_type == OperationType.DELETION)
            .order_by(Operation.id)).all()
        # Unlinked before the kill: its own claim is completed. Not unlinked: the claim is
        # closed as abandoned and a new, freshly certified deletion did it.
        assert [op.status for op in ended] == (
            [OperationStatus.COMPLETED] if kill == "after-unlink"
            else [OperationStatus.FAILED, OperationStatus.COMPLETED])
        assert ("lease ran out" if claimed_on == "another host" else
                f"its process {owner} on this host is gone") in (ended[0].error or "")
        diagnosis = {s.stage: s for s in diagnose(session, config, package, utcnow())}
        assert diagnosis["purge"].state == "done"


def _status(opsdb: OpsDB, copy_id: int) -> CopyStatus:
    with opsdb.session() as session:
        return session.get_one(PhysicalCopy, copy_id).status

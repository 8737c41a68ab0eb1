"""Clocks that differ between hosts, or step while work is in flight (NTP correcting a wrong
clock by hours). A decision that compares a wall-clock time written by one host or process
with `utcnow()` in another never turns into a deletion without a verified copy, nor a live
operation taken for abandoned."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_dt import claims, reaper
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    utcnow,
)
from ccat_dt.packages import get_package
from ccat_dt.topology import primary_location
from tests.faults.pipeline import deployment, observe, plan
from tests.faults.storage_truth import lost_filed_files
from tests.faults.test_deletion_faults import (
    _sites,
    archived_with_sources,
    flip_middle_byte,
    lta_tar,
    retention,
)

KEEP = 1000.0
WINDOW_H = 1.0  # policies.deletion_recheck_hours: re-hash an LTA copy not hashed this recently


@pytest.fixture
def kept_hourly(tmp_path: Path) -> Config:
    return deployment(tmp_path / "kept", sites=_sites(KEEP),
                      policies={"deletion_recheck_hours": WINDOW_H})


def _silent_rot(path: Path) -> None:
    """Bit rot in place: size, inode and mtime unchanged (what a disk does)."""
    info = path.stat()
    flip_middle_byte(path)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


@pytest.mark.parametrize("skew_h", [-3.0, 3.0], ids=["verifier-clock-right", "verifier-3h-ahead"])
def test_lta_verified_by_a_host_whose_clock_is_ahead_is_still_rehashed_before_sources_go(
        kept_hourly: Config, instance: DagsterInstance, skew_h: float) -> None:
    """The archive-site host that last verified the LTA copies had its clock 3 h ahead: their
    verified_at lies in the observatory's future. Both LTA tars then rot in place. The purge
    must re-hash them (the policy: hashed within 1 h) and keep the sources. (With verified_at
    3 h in the past, the same purge re-hashes and keeps them: the control.)"""
    opsdb, package, files = archived_with_sources(kept_hourly, instance)
    with opsdb.session() as session:
        lta = [c for c in session.scalars(select(PackageCopy))
               if c.location.location_type == LocationType.LONG_TERM_ARCHIVE]
        assert len(lta) == 2
        for copy in lta:  # as the skewed host wrote it when it verified them
            copy.verified_at = utcnow() + timedelta(hours=skew_h)
            if skew_h < 0:
                copy.created_at = copy.verified_at - timedelta(minutes=1)
    for site in ("cologne", "us"):
        _silent_rot(lta_tar(kept_hourly, site, package))

    config = retention(kept_hourly, 0)
    reaper.purge_package(opsdb, config, package)

    assert all(p.exists() for p in files), "sources deleted on rotten LTA copies"
    assert lost_filed_files(config, opsdb) == []


def _package_and_buffer(config: Config, instance: DagsterInstance) -> tuple[OpsDB, int, int]:
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb)
    name = plan(config, opsdb, instance)
    with opsdb.session() as session:
        package = get_package(session, name)
        return opsdb, package.id, primary_location(session, "cologne", LocationType.BUFFER).id


def test_a_transfer_claim_renewed_just_now_by_a_host_whose_clock_is_behind_is_not_taken_over(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """Host B (transferring to cologne) runs 10 min behind this host. B just renewed its
    claim: by B's clock its lease runs 5 more minutes. This host must see a live claim and
    wait, not close it as abandoned and start a second transfer to the same place."""
    config = deployment(tmp_path / "d")
    opsdb, package_id, destination_id = _package_and_buffer(config, instance)
    b_now = utcnow() - timedelta(minutes=10)
    with opsdb.session() as session:
        operation = Operation(operation_type=OperationType.TRANSFER, package_id=package_id,
                              destination_location_id=destination_id,
                              status=OperationStatus.IN_PROGRESS, started_at=b_now)
        operation.owner_host, operation.owner_pid = "archive-b pid:[4026531836]", 4242
        operation.lease_until = b_now + claims.LEASE  # B's hold()/Lease._renew
        session.add(operation)
        session.flush()
        op_id = operation.id
    with opsdb.session() as session:
        live = claims.live_claim(session, package_id, destination_id)
    with opsdb.session() as session:
        status, error = session.execute(select(Operation.status, Operation.error)
                                        .where(Operation.id == op_id)).one()
    assert live is not None and live.id == op_id, f"live claim taken over: {status} {error}"
    assert status == OperationStatus.IN_PROGRESS


def test_a_deletion_running_on_this_host_is_not_abandoned_when_the_clock_steps_forward(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """A purge on this host is deleting (hashing a big source before its unlink: its process
    runs). NTP then steps this host's clock forward by 2 h (it was 2 h slow). Another purge
    on this host must not judge the deletion abandoned (its process runs), put the copy back
    to PRESENT and act on it too."""
    config = deployment(tmp_path / "d")
    opsdb, package_id, destination_id = _package_and_buffer(config, instance)
    deleting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = utcnow()
        with opsdb.session() as session:
            operation = Operation(operation_type=OperationType.DELETION, package_id=package_id,
                                  status=OperationStatus.IN_PROGRESS, started_at=started)
            claims.hold(operation, started, lease=claims.DELETION_LEASE)
            operation.owner_pid = deleting.pid  # the purge process, on this host
            session.add(operation)
            session.flush()
            op_id = operation.id
        stepped = utcnow() + timedelta(hours=2)  # the clock after NTP's step
        with opsdb.session() as session:
            why = claims.abandoned_deletion(session.get_one(Operation, op_id), stepped)
        assert why is None, f"a running deletion judged abandoned: {why}"
    finally:
        deleting.kill()
        deleting.wait()

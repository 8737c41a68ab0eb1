"""Failover (issue 13, item 3): a dead top-priority buffer is passed over for the next by
priority, and a primary archive site down past its failover horizon is replaced by another
archive site for packages not yet sent; each ends with a plain drive (no `retry`) and checks
the invariant on the storage."""

from __future__ import annotations

import copy
import time
from datetime import timedelta
from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_assets import cli
from ccat_dt.config import Config
from ccat_dt.defaults import EMBEDDED_DEFAULT
from ccat_dt.diagnosis import diagnose
from ccat_dt.health import sites_down
from ccat_dt.marker import MARKER, write_marker
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    RawDataPackage,
    _aware,
    utcnow,
)
from ccat_dt.packages import package_path
from ccat_dt.topology import get_site
from tests.faults.conftest import FAST_BACKOFF
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import archived_everywhere, deployment, observe, package_names, run
from tests.faults.storage_truth import good_archive_sites, lost_filed_files
from tests.notify_servers import Receiver


def _two_observatory_buffers(hold_minutes: float) -> dict[str, object]:
    sites = copy.deepcopy(EMBEDDED_DEFAULT["sites"])
    assert isinstance(sites, list)
    sites[0]["locations"] = [
        {"name": "instruments", "type": "source", "root": "sites/ccat/instruments"},
        {"name": "buffer", "type": "buffer", "root": "sites/ccat/buffer", "priority": 10},
        {"name": "buffer2", "type": "buffer", "root": "sites/ccat/buffer2", "priority": 0}]
    return {"sites": sites, "policies": {"retry_backoff_first_s": FAST_BACKOFF,
                                         "location_unhealthy_minutes": hold_minutes}}


def _tars(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*.tar"))


def test_dead_top_priority_buffer_is_passed_over_and_used_again_once_healthy(
        tmp_path: Path, instance: DagsterInstance, capsys: pytest.CaptureFixture[str]) -> None:
    hold_s = 40.0  # outlasts the first drive even under load; brought forward below
    config = deployment(tmp_path / "deploy", **_two_observatory_buffers(hold_s / 60))
    opsdb = OpsDB(config.opsdb_url)
    top, second = (config.resolve_root(f"sites/ccat/{name}") for name in ("buffer", "buffer2"))
    (top / MARKER).unlink()  # the disk behind the top buffer is gone (an empty mount point)
    files = observe(config, opsdb, name="obs-0")

    report = run(config, instance, wait_s=2)

    [first] = package_names(opsdb)
    assert report.failed == [], report.failed
    archived_everywhere(config, opsdb)
    assert _tars(top) == []  # nothing was ever written onto the unmarked root
    with opsdb.session() as session:
        built = session.scalars(select(PackageCopy).join(DataLocation).where(
            DataLocation.name == "buffer2")).all()
        assert [c.status for c in built] == [CopyStatus.DELETED]  # built there, purged after
        failed = session.scalars(select(Operation).where(
            Operation.operation_type == OperationType.PACKAGING,
            Operation.status == OperationStatus.FAILED)).all()
        assert failed and MARKER in (failed[0].error or "")
        stages = {s.stage: s for s in diagnose(session, config, first, utcnow())}
    unhealthy = stages["location ccat/buffer"]
    assert unhealthy.state == "unhealthy" and "unhealthy until" in unhealthy.detail
    assert MARKER in unhealthy.detail
    cli.main(["--config", str(config.path), "status"])
    assert "location ccat/buffer unhealthy until" in capsys.readouterr().out
    assert not any(p.is_file() for p in files)  # the sources were purged ...
    assert all(len(sites) == 2 for sites in good_archive_sites(config, opsdb).values())
    assert lost_filed_files(config, opsdb) == []  # ... each byte in two good LTA tars

    # The disk is back; once the hold is over new work goes to the top buffer again. The
    # hold ends now instead of in up to 40 s (its end is a time in OpsDB, read as it is).
    write_marker(top)
    with opsdb.session() as session:
        [held] = [loc for loc in session.scalars(select(DataLocation))
                  if loc.unhealthy_until is not None]
        until = held.unhealthy_until
        assert until is not None and _aware(until) > utcnow()  # held when the drive ended
        held.unhealthy_until = utcnow() - timedelta(seconds=1)
    observe(config, opsdb, name="obs-1")
    assert run(config, instance, wait_s=2).failed == []
    second_package = package_names(opsdb)[-1]
    with opsdb.session() as session:
        package = session.scalar(select(RawDataPackage).where(
            RawDataPackage.name == second_package))
        assert package is not None
        where = [c.location.label for c in package.copies
                 if c.location.site.short_name == "ccat"]
        assert where == ["ccat/buffer"]
        location = session.scalar(select(DataLocation).where(DataLocation.name == "buffer",
                                                             DataLocation.root == str(top)))
        assert location is not None and location.failing_since is None
    assert _tars(second) == []
    archived_everywhere(config, opsdb)
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)


def test_the_only_observatory_buffer_unmounted_is_tried_once_per_run_and_heals_once_back(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    """With no other buffer to go to, retrying inside the run only repeats the fault: one
    attempt, the cause as the headline (which buffer, why); nothing written onto the mount
    point; once the disk is back the automatic re-attempt builds and sends the package."""
    buffer = config.resolve_root("sites/ccat/buffer")
    (buffer / MARKER).unlink()
    observe(config, opsdb, name="obs-0")

    report = run(config, instance, wait_s=0)

    assert list(buffer.rglob("*")) == []  # nothing written onto the bare mount point
    with opsdb.session() as session:
        failed = session.scalars(select(Operation).where(
            Operation.operation_type == OperationType.PACKAGING)).all()
    assert report.failed and len(failed) == len(report.failed), report.failed  # one per run
    write_marker(buffer)
    run(config, instance)
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)


def test_archive_site_down_past_its_horizon_is_replaced_for_packages_not_yet_sent(
        tmp_path: Path, instance: DagsterInstance, webhook_receiver: Receiver,
        capsys: pytest.CaptureFixture[str]) -> None:
    horizon_h = 2.0 / 3600
    config = deployment(tmp_path / "deploy", notifications={
        "webhook": {"url": webhook_receiver.url, "timeout_s": 2}}, policies={
        "retry_backoff_first_s": 0.5, "retry_backoff_max_hours": 8.0 / 3600,
        "site_failover_hours": horizon_h})
    opsdb = OpsDB(config.opsdb_url)
    cologne_buffer = config.resolve_root("sites/cologne/buffer")
    (cologne_buffer / MARKER).unlink()  # cologne's buffer disk is gone
    files = observe(config, opsdb, name="obs-0")

    run(config, instance, wait_s=0)  # built; sending it to cologne (its primary) fails
    [name] = package_names(opsdb)
    with opsdb.session() as session:
        [first] = session.scalars(select(Operation).where(
            Operation.operation_type == OperationType.TRANSFER).order_by(Operation.id)
            .limit(1)).all()
        assert session.get_one(DataLocation, first.destination_location_id).label \
            == "cologne/buffer"
        assert first.status == OperationStatus.FAILED and MARKER in (first.error or "")
        [since] = [loc.failing_since for loc in session.scalars(select(DataLocation))
                   if loc.failing_since is not None]
    past = _aware(since) + timedelta(hours=horizon_h) - utcnow()
    time.sleep(max(0.0, past.total_seconds()) + 0.5)

    run(config, instance, wait_s=0)  # past the horizon: re-routed to us, archived there

    with opsdb.session() as session:
        assert list(sites_down(session, config, utcnow())) == ["cologne"]
        package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == name))
        assert package is not None and package.primary_site.short_name == "us"
        assert "re-routed from cologne to us" in (package.primary_site_note or "")
        stages = {s.stage: s for s in diagnose(session, config, name, utcnow())}
        observatory_sends = [session.get_one(DataLocation, op.destination_location_id).label
                             for op in session.scalars(select(Operation).where(
                                 Operation.operation_type == OperationType.TRANSFER,
                                 Operation.status == OperationStatus.COMPLETED,
                                 Operation.source_location_id == _buffer_id(session, "ccat")))]
    assert stages["routing"].state == "rerouted"
    cli.main(["--config", str(config.path), "status"])
    assert "archive site cologne DOWN past the failover horizon" in capsys.readouterr().out
    assert observatory_sends == ["us/buffer"]
    assert _tars(cologne_buffer) == []  # the observatory never sent it to cologne
    assert good_archive_sites(config, opsdb) and all(
        sites == {"us/lta"} for sites in good_archive_sites(config, opsdb).values())
    assert all(p.is_file() for p in files)  # one LTA copy of two: the sources stay
    assert lost_filed_files(config, opsdb) == []
    told = [t for t in webhook_receiver.texts if "cologne" in t]
    assert len(told) == 1 and "unreachable" in told[0], webhook_receiver.texts

    # cologne comes back: a plain drive replicates the package there from us, then purges.
    write_marker(cologne_buffer)
    run(config, instance, wait_s=10)

    archived_everywhere(config, opsdb)
    assert all(sites == {"us/lta", "cologne/lta"}
               for sites in good_archive_sites(config, opsdb).values())
    assert lost_filed_files(config, opsdb) == []
    with opsdb.session() as session:
        assert sites_down(session, config, utcnow()) == {}
        package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == name))
        assert package is not None
        [cologne] = [c for c in package.copies if c.location.label == "cologne/buffer"]
        [arrival] = session.scalars(select(Operation).where(
            Operation.copy_id == cologne.id,
            Operation.operation_type == OperationType.TRANSFER)).all()
        assert session.get_one(DataLocation, arrival.source_location_id).label == "us/lta"
    assert (config.resolve_root("sites/cologne/lta") / package_path_of(opsdb, name)).is_file()
    about = [t.split("\n")[0] for t in webhook_receiver.texts if "cologne" in t]
    assert len(about) == 2 and "RESOLVED" not in about[0], about  # told once, then resolved
    assert "RESOLVED" in about[1] and "unreachable" in about[1]
    assert_safe(config, opsdb)


def _buffer_id(session: Session, site: str) -> int:
    [buffer] = [loc for loc in get_site(session, site).locations
                if loc.location_type == LocationType.BUFFER]
    return buffer.id


def package_path_of(opsdb: OpsDB, name: str) -> str:
    with opsdb.session() as session:
        package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == name))
        assert package is not None
        return package_path(package)


def test_dead_top_priority_buffer_at_an_archive_site_is_passed_over_within_the_run(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """An archive site with two buffers, the first one's disk gone: the transfer fails there,
    the buffer is marked unhealthy and the same run's retry lands in the second."""
    sites = copy.deepcopy(EMBEDDED_DEFAULT["sites"])
    assert isinstance(sites, list)
    sites[1]["locations"] = [
        {"name": "buffer", "type": "buffer", "root": "sites/cologne/buffer", "priority": 5},
        {"name": "spare", "type": "buffer", "root": "sites/cologne/spare"},
        {"name": "lta", "type": "long_term_archive", "root": "sites/cologne/lta"}]
    config = deployment(tmp_path / "deploy", sites=sites,
                        policies={"retry_backoff_first_s": FAST_BACKOFF})
    opsdb = OpsDB(config.opsdb_url)
    dead = config.resolve_root("sites/cologne/buffer")
    (dead / MARKER).unlink()
    observe(config, opsdb)

    report = run(config, instance)

    assert report.failed == [], report.failed  # healed inside the run: no failed run at all
    archived_everywhere(config, opsdb)
    assert _tars(dead) == []
    with opsdb.session() as session:
        labels = [(session.get_one(DataLocation, op.destination_location_id).label, op.status)
                  for op in session.scalars(select(Operation).where(
                      Operation.operation_type == OperationType.TRANSFER)
                      .order_by(Operation.id))]
    assert labels[0] == ("cologne/buffer", OperationStatus.FAILED)
    assert ("cologne/spare", OperationStatus.COMPLETED) in labels
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)

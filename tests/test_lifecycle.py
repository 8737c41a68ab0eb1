"""The spine end to end: real sensors evaluated and real runs executed against a persistent
Dagster instance, then OpsDB and the files on disk inspected."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetKey,
    AssetRecordsFilter,
    BetaWarning,
    DagsterInstance,
    PreviewWarning,
)
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.event_log.base import PartitionKeyFilter
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_assets.partitions import package_site_key
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationType,
    PackageCopy,
    PackageState,
    RawDataPackage,
    Site,
)
from ccat_dt.reaper import certificate_problems
from ccat_dt.report import disagreements
from ccat_dt.storage import files_under
from tests.helpers import first_caller, observe

warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)


def packages(opsdb: OpsDB) -> list[RawDataPackage]:
    with opsdb.session() as session:
        found = session.scalars(select(RawDataPackage).order_by(RawDataPackage.id)).all()
        for package in found:  # load what the assertions read
            _ = package.primary_site.short_name, [c.location.site for c in package.copies]
        return list(found)


def lta_copies(opsdb: OpsDB, package: str) -> list[PackageCopy]:
    """The package's present LTA copies, with their locations loaded."""
    with opsdb.session() as session:
        found = session.scalars(select(PackageCopy).join(DataLocation).where(
            PackageCopy.package.has(RawDataPackage.name == package),
            PackageCopy.status == CopyStatus.PRESENT,
            DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE)).all()
        for copy in found:
            _ = copy.location.site.short_name
        return list(found)


def certificates(opsdb: OpsDB) -> list[dict[str, Any]]:
    """Every deletion certificate's evidence."""
    with opsdb.session() as session:
        return [op.evidence for op in session.scalars(select(Operation).where(
            Operation.operation_type == OperationType.DELETION))
            if op.evidence and "copies" in op.evidence]


def test_lifecycle_reaches_both_archives_and_purges_the_observatory(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    source = observe(config, opsdb)
    defs = build_definitions(config)

    report = drive(defs, instance)

    assert report.failed == []
    found = packages(opsdb)
    assert len(found) == 4  # 2 observations x 2 modules
    for package in found:
        assert package.state == PackageState.ARCHIVED
        lta = [c for c in package.copies
               if c.location.location_type == LocationType.LONG_TERM_ARCHIVE]
        assert sorted(c.location.site.short_name for c in lta) == ["cologne", "us"]
        for copy in lta:
            assert copy.is_verified
            assert hash_file(Path(copy.location.root) / copy.relative_path)[0] == package.checksum
        assert all(c.status == CopyStatus.DELETED for c in package.copies
                   if c.location.location_type == LocationType.BUFFER)
        assert certificate_problems(opsdb, config, package.name) == []
    assert files_under(source) == []
    assert disagreements(opsdb) == []

    # Dagster mirrors OpsDB: every partition materialised, every integrity check passed.
    names = {p.name for p in found}
    assert instance.get_materialized_partitions(AssetKey("purge_status")) == names
    assert len(instance.get_materialized_partitions(AssetKey("lta_copies"))) == 2 * len(names)
    for asset, check in [("packages", "package_checksum"), ("site_copies", "site_copy_checksum"),
                         ("lta_copies", "lta_copy_checksum")]:
        history = instance.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(AssetKey(asset), check), limit=100)
        assert history and all(r.status == AssetCheckExecutionRecordStatus.SUCCEEDED
                               for r in history)
    # The assets' truth is in OpsDB and on the storage: the instance keeps no file per package
    # (a pickle per asset and partition would grow without bound at 10^5 packages a year).
    storage = Path(instance.storage_directory())
    assert not any(name in str(p) for p in storage.rglob("*") for name in names)

    # A replayed drive (cursors lost, e.g. after a restart) launches nothing twice.
    again = drive(defs, instance)
    assert again.launched == []


def test_each_package_leaves_the_observatory_once_round_robin(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    observe(config, opsdb, observations=2, files=1)
    assert drive(build_definitions(config), instance).failed == []

    with opsdb.session() as session:
        observatory_buffer = session.scalar(select(DataLocation.id).join(Site).where(
            Site.short_name == "ccat", DataLocation.location_type == LocationType.BUFFER))
        rows = session.execute(
            select(RawDataPackage.name, Site.short_name)
            .join(Operation, Operation.package_id == RawDataPackage.id)
            .join(DataLocation, Operation.destination_location_id == DataLocation.id)
            .join(Site, DataLocation.site_id == Site.id)
            .where(Operation.operation_type == OperationType.TRANSFER,
                   Operation.source_location_id == observatory_buffer)
            .order_by(RawDataPackage.id)).all()
        primaries = session.execute(select(RawDataPackage.name, Site.short_name).join(
            Site, RawDataPackage.primary_site_id == Site.id).order_by(RawDataPackage.id)).all()
    assert sorted(rows) == sorted(primaries)  # one transfer out per package, to its primary
    assert [site for _, site in primaries] == ["cologne", "us", "cologne", "us"]


def test_flipped_byte_in_site_copy_fails_its_check_and_is_sent_again(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Bit rot in the first copy that left the observatory, between its arrival and its check:
    the copy's check in its run fails (the check, or its archiving step finding it bad), the
    copy is quarantined and never relied on; no archive holds the package
    yet, so the primary site is fed again from the observatory's verified buffer, and the
    package goes all the way, every deletion under copies that are good on the storage."""
    source = observe(config, opsdb, observations=1, files=2)
    written = {p: hash_file(p)[0] for p in files_under(source)}
    import resources.placement as placement

    real_place = placement.place
    marker = config.directory / "victim"  # the runs execute in child processes

    def place_then_rot(*args, **kwargs):  # type: ignore[no-untyped-def]
        placed = real_place(*args, **kwargs)
        ref = placed.ref
        if args[3] == LocationType.BUFFER and first_caller(marker, f"{ref.package} {ref.copy_id}"):
            # the first copy into an archive buffer
            with open(ref.path, "r+b") as handle:  # bit rot between arrival and the check
                handle.seek(ref.size // 2)
                byte = handle.read(1)
                handle.seek(ref.size // 2)
                handle.write(bytes([byte[0] ^ 0x01]))
        return placed

    monkeypatch.setattr(placement, "place", place_then_rot)
    drive(build_definitions(config), instance)

    victim, rotten_id = marker.read_text().split()
    with opsdb.session() as session:
        made = session.scalars(select(Operation).where(
            Operation.copy_id == int(rotten_id),
            Operation.operation_type == OperationType.TRANSFER)).one()
        run_id = made.run_id
        partition = str(package_site_key(victim, session.get_one(
            PackageCopy, int(rotten_id)).location.site.short_name))
    # The UI shows the rot on the rotten copy's materialization, in the run that made it,
    # whichever order Dagster gave the check and the archiving step of that copy-and-archive
    # run: the check before passed on the transport's read of the landed bytes, then the
    # archiving step, finding its source bad, failed it (before, it stayed passed unless the
    # integrity sensor's report happened to run between that run and the copy's repair).
    [rotten] = [r for r in instance.fetch_materializations(AssetRecordsFilter(
        asset_key=AssetKey("site_copies"), asset_partitions=[partition]), limit=10).records
        if r.run_id == run_id]
    [own] = [r for r in instance.event_log_storage.get_asset_check_execution_history(
        AssetCheckKey(AssetKey("site_copies"), "site_copy_checksum"), limit=10,
        partition_filter=PartitionKeyFilter(key=partition)) if r.run_id == run_id]
    assert own.status == AssetCheckExecutionRecordStatus.FAILED, own.status
    assert own.event is not None and own.event.dagster_event is not None
    evaluation = own.event.dagster_event.event_specific_data
    assert isinstance(evaluation, AssetCheckEvaluation)
    assert evaluation.target_materialization_data is not None
    assert evaluation.target_materialization_data.storage_id == rotten.storage_id
    assert "checksum mismatch" in (evaluation.description or "")
    with opsdb.session() as session:
        failed = session.scalars(select(Operation).where(
            Operation.copy_id == int(rotten_id),
            Operation.operation_type == OperationType.VERIFICATION)).all()
        assert any(op.error and "checksum mismatch" in op.error for op in failed)
        sent = session.scalars(select(Operation).join(
            DataLocation, Operation.source_location_id == DataLocation.id).join(Site).where(
            Operation.operation_type == OperationType.TRANSFER, Site.short_name == "ccat",
            Operation.package.has(RawDataPackage.name == victim))).all()
    assert len(sent) == 2  # the observatory link, a second time for this package only
    assert all(p.state == PackageState.ARCHIVED for p in packages(opsdb))
    for name in (p.name for p in packages(opsdb)):
        assert certificate_problems(opsdb, config, name) == []
        for site in ("cologne", "us"):  # the storage: each archive holds the package's bytes
            [copy] = [c for c in lta_copies(opsdb, name) if c.location.site.short_name == site]
            assert hash_file(Path(copy.location.root) / copy.relative_path)[0] == copy.checksum
    assert all(int(rotten_id) not in {c["copy_id"] for c in cert["copies"]}
               for cert in certificates(opsdb))
    assert len(written) == 4 and disagreements(opsdb) == []


def test_package_copies_never_bypass_verification(config: Config, opsdb: OpsDB,
                                                  instance: DagsterInstance) -> None:
    """A source file altered after filing is caught in the packaging pass: nothing leaves."""
    source = observe(config, opsdb, observations=1, files=1)
    tampered = next(source.rglob("scan-0.dat"))
    data = bytearray(tampered.read_bytes())
    data[0] ^= 0xFF
    tampered.write_bytes(bytes(data))

    report = drive(build_definitions(config), instance)

    assert any(key.startswith("package:") for key in report.failed)
    with opsdb.session() as session:
        failed = session.scalars(select(RawDataPackage).where(
            RawDataPackage.state == PackageState.FAILED)).all()
        assert len(failed) == 1
        assert session.scalar(select(PackageCopy.id).join(DataLocation).join(Site).where(
            PackageCopy.package_id == failed[0].id, Site.short_name != "ccat")) is None
        operation = session.scalars(select(Operation).where(
            Operation.package_id == failed[0].id,
            Operation.operation_type == OperationType.PACKAGING)).one()
        assert "checksum mismatch" in (operation.error or "")
    assert tampered.is_file()

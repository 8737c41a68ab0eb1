"""The spine end to end: real sensors evaluated and real runs executed against a persistent
Dagster instance, then OpsDB and the files on disk inspected."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from dagster import AssetCheckKey, AssetKey, BetaWarning, DagsterInstance, PreviewWarning
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.diagnosis import diagnose
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
    utcnow,
)
from ccat_dt.reaper import certificate_problems, purge_package
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


def test_flipped_byte_in_site_copy_fails_its_check_and_blocks_the_purge(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    source = observe(config, opsdb, observations=1, files=2)
    import resources.placement as placement

    real_place = placement.place
    marker = config.directory / "victim"  # the runs execute in child processes

    def place_then_rot(*args, **kwargs):  # type: ignore[no-untyped-def]
        placed = real_place(*args, **kwargs)
        ref = placed.ref
        if args[3] == LocationType.BUFFER and first_caller(marker, ref.package):
            # the first copy into an archive buffer
            with open(ref.path, "r+b") as handle:  # bit rot between arrival and the check
                handle.seek(ref.size // 2)
                byte = handle.read(1)
                handle.seek(ref.size // 2)
                handle.write(bytes([byte[0] ^ 0x01]))
        return placed

    monkeypatch.setattr(placement, "place", place_then_rot)
    drive(build_definitions(config), instance)

    victim = marker.read_text()
    by_name = {p.name: p for p in packages(opsdb)}
    rotten = [c for c in by_name[victim].copies if c.status == CopyStatus.CORRUPT]
    assert len(rotten) == 1 and rotten[0].location.location_type == LocationType.BUFFER
    check_key = AssetCheckKey(AssetKey("site_copies"), "site_copy_checksum")
    history = instance.event_log_storage.get_asset_check_execution_history(check_key, limit=10)
    assert any(r.status == AssetCheckExecutionRecordStatus.FAILED for r in history)

    # The victim is not purged anywhere; its raw files are all still at the source.
    assert by_name[victim].state != PackageState.ARCHIVED
    with opsdb.session() as session:
        victim_files = [Path(f.source_location.root) / f.relative_path
                        for f in session.scalars(select(RawDataPackage).where(
                            RawDataPackage.name == victim)).one().files]
    assert victim_files and all(p.is_file() for p in victim_files)
    with opsdb.session() as session:  # what an operator sees with `ccat-dt why`
        stages = {s.stage: s for s in diagnose(session, config, victim, utcnow())}
    primary = next(s for s in stages.values() if s.state == "quarantined")
    assert primary.stage.startswith("site copy") and "failed its integrity check" in primary.detail
    assert "integrity check failed" in stages["purge"].detail
    report = purge_package(opsdb, config, victim)  # even asked directly, it refuses
    assert report.deleted == 0
    assert any("integrity check failed" in d.reason for d in report.kept)
    # ... while the healthy package went all the way.
    [healthy] = [p for name, p in by_name.items() if name != victim]
    assert healthy.state == PackageState.ARCHIVED
    assert set(files_under(source)) == set(victim_files)


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

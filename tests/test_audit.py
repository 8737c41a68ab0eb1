"""The audit: OpsDB against the disks after a real lifecycle, and a repair that only ever makes
the purge more careful (lost/changed copies become CORRUPT; unknown files are never touched)."""

from __future__ import annotations

import copy as copylib
import os
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt import claims
from ccat_dt.audit import audit
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import CONFIG_NAME, EMBEDDED_DEFAULT, write_default_config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    Base,
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PackageState,
    PhysicalCopy,
    RawDataFile,
    RawDataFileCopy,
    RawDataPackage,
    Site,
    utcnow,
)
from ccat_dt.reaper import purge_package
from ccat_dt.storage import files_under
from ccat_dt.topology import get_location, prepare_opsdb, sync_topology
from ccat_dt.transports.bbcp import STAGING_DIR
from tests.helpers import flip_byte, observe

RETENTION_HOURS = 1000.0  # buffers and source keep their copies, so a purge has work to do
LATER = timedelta(hours=2 * RETENTION_HOURS)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real lifecycle (sensors, runs, checks) per module; each test audits a copy of it."""
    base = tmp_path_factory.mktemp("audit-template")
    sites: Any = copylib.deepcopy(EMBEDDED_DEFAULT["sites"])
    for site in sites:
        for location in site["locations"]:
            if location["type"] in ("source", "buffer"):
                location["retention_hours"] = RETENTION_HOURS
    config = load_config(write_default_config(base / "deploy", {"sites": sites}))
    prepare_opsdb(config)
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1, files=2)
    home = base / "dagster_home"
    home.mkdir()
    with DagsterInstance.from_config(str(home)) as instance:
        assert drive(build_definitions(config), instance).failed == []
    opsdb.dispose()
    return base / "deploy"


@pytest.fixture
def config(template: Path, tmp_path: Path) -> Config:
    """A private copy of the lifecycle's data and OpsDB, re-rooted at its new place."""
    shutil.copytree(template, tmp_path / "deploy")
    cfg = load_config(tmp_path / "deploy" / CONFIG_NAME)
    opsdb = OpsDB(cfg.opsdb_url)
    with opsdb.session() as session:
        sync_topology(session, cfg)
    opsdb.dispose()
    return cfg


@pytest.fixture
def lta(opsdb: OpsDB) -> Iterator[list[tuple[str, int, Path]]]:
    """(package, copy id, path) of every LTA copy."""
    with opsdb.session() as session:
        rows = session.execute(
            select(RawDataPackage.name, PackageCopy.id, DataLocation.root,
                   PackageCopy.relative_path)
            .join(PackageCopy, PackageCopy.package_id == RawDataPackage.id)
            .join(DataLocation, PackageCopy.location_id == DataLocation.id)
            .where(DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE)
            .order_by(PackageCopy.id)).all()
    yield [(name, copy_id, Path(root) / relative) for name, copy_id, root, relative in rows]


def status(opsdb: OpsDB, copy_id: int) -> CopyStatus:
    with opsdb.session() as session:
        return session.get_one(PhysicalCopy, copy_id).status


def buffer_root(opsdb: OpsDB, site: str) -> Path:
    with opsdb.session() as session:
        return Path(get_location(session, site, "buffer").root)


def db_snapshot(opsdb: OpsDB) -> dict[str, list[tuple[Any, ...]]]:
    with opsdb.session() as session:
        return {table.name: [tuple(row) for row in session.execute(
            select(table).order_by(*table.primary_key.columns)).all()]
            for table in Base.metadata.sorted_tables}


def disk_snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_clean_lifecycle_audits_clean_before_and_after_the_purge(
        config: Config, opsdb: OpsDB) -> None:
    report = audit(opsdb, checksums=True)
    assert report.findings == []
    assert report.checked_copies == report.scanned_files > 0  # every file is a known copy

    with opsdb.session() as session:
        names = session.scalars(select(RawDataPackage.name)).all()
    purged = [purge_package(opsdb, config, name, now=utcnow() + LATER) for name in names]
    assert all(p.deleted > 0 and p.failures == [] for p in purged)

    after = audit(opsdb, checksums=True)
    assert after.findings == []  # DELETED copies whose files are gone are what OpsDB says
    assert 0 < after.checked_copies < report.checked_copies
    with opsdb.session() as session:
        kinds = set(session.scalars(select(PhysicalCopy.kind).where(
            PhysicalCopy.status == CopyStatus.DELETED)))
    assert kinds == {"package", "raw_file"}


@pytest.mark.parametrize("during", ["listing", "look"])
def test_an_audit_during_a_purge_reports_nothing_for_what_the_purge_deleted(
        config: Config, opsdb: OpsDB, monkeypatch: pytest.MonkeyPatch, during: str) -> None:
    """An operator audits a running system: a purge deletes buffer copies (certified) after the
    audit read OpsDB for that location and before it listed or re-read the files. The files
    are rightly gone: no "lost" or "cannot read" finding, exit 0, and repair marks nothing."""
    from ccat_dt.objectstore import Stores

    with opsdb.session() as session:
        names = session.scalars(select(RawDataPackage.name)).all()
    buffer = str(buffer_root(opsdb, "ccat"))
    real = getattr(Stores, during)
    purged: list[int] = []

    def purge_then(self: Stores, root: str, *args: Any, **kwargs: Any) -> Any:
        if root == buffer and not purged:
            purged.extend(purge_package(opsdb, config, name, now=utcnow() + LATER).deleted
                          for name in names)
        return real(self, root, *args, **kwargs)

    monkeypatch.setattr(Stores, during, purge_then)
    report = audit(opsdb, checksums=True, repair=True, config=config)

    assert sum(purged) > 0
    assert not any(p.name.endswith(".tar") for p in Path(buffer).rglob("*"))  # the storage
    assert report.findings == [] and report.repaired == []
    with opsdb.session() as session:
        assert session.scalars(select(PhysicalCopy).where(
            PhysicalCopy.status == CopyStatus.CORRUPT)).all() == []


def test_lost_lta_file_is_reported_and_repair_freezes_its_package(
        config: Config, opsdb: OpsDB, lta: list[tuple[str, int, Path]]) -> None:
    victim, copy_id, path = lta[0]
    path.unlink()

    report = audit(opsdb)
    assert [(f.kind, f.copy_id, f.path) for f in report.findings] == [("lost", copy_id,
                                                                       str(path))]
    assert report.repaired == [] and status(opsdb, copy_id) == CopyStatus.PRESENT

    repaired = audit(opsdb, repair=True, config=config)
    assert len(repaired.repaired) == 1 and str(copy_id) in repaired.repaired[0]
    assert status(opsdb, copy_id) == CopyStatus.CORRUPT
    assert not path.exists()  # never re-created, never "fixed" by marking PRESENT
    with opsdb.session() as session:
        [operation] = session.scalars(select(Operation).where(
            Operation.copy_id == copy_id,
            Operation.operation_type == OperationType.VERIFICATION,
            Operation.status == OperationStatus.FAILED)).all()
        assert "missing on disk" in (operation.error or "")
        package = session.scalars(select(RawDataPackage).where(
            RawDataPackage.name == victim)).one()
        assert package.state == PackageState.TRANSFERRING  # one archive copy short again
    assert audit(opsdb).problems == []  # recorded now: not reported again

    frozen = purge_package(opsdb, config, victim, now=utcnow() + LATER)
    assert frozen.deleted == 0
    assert frozen.kept and all("integrity check failed" in d.reason for d in frozen.kept
                               if d.location_type != LocationType.LONG_TERM_ARCHIVE)
    [healthy] = {name for name, _, _ in lta} - {victim}
    assert purge_package(opsdb, config, healthy, now=utcnow() + LATER).deleted > 0


def test_corrupt_copy_restored_from_a_backup_is_present_again_only_when_its_bytes_match(
        config: Config, opsdb: OpsDB, lta: list[tuple[str, int, Path]],
        tmp_path: Path) -> None:
    """The advice for a LOST package: put a copy back at its recorded path, then
    `audit --checksums --repair`. Only bytes that match the recorded checksum count."""
    victim, copy_id, path = lta[0]
    backup = tmp_path / "backup.tar"
    shutil.copy2(path, backup)
    flip_byte(path)
    audit(opsdb, checksums=True, repair=True, config=config)
    assert status(opsdb, copy_id) == CopyStatus.CORRUPT

    assert audit(opsdb, checksums=True, repair=True, config=config).repaired == []
    assert status(opsdb, copy_id) == CopyStatus.CORRUPT  # still the wrong bytes

    shutil.copy2(backup, path)  # restored by a person
    assert audit(opsdb).problems == []  # sizes alone: a corrupt copy promises nothing
    [finding] = audit(opsdb, checksums=True).findings
    assert (finding.kind, finding.copy_id) == ("intact_again", copy_id)
    assert status(opsdb, copy_id) == CopyStatus.CORRUPT  # without repair nothing changes

    report = audit(opsdb, checksums=True, repair=True, config=config)
    assert len(report.repaired) == 1 and "present" in report.repaired[0]
    assert status(opsdb, copy_id) == CopyStatus.PRESENT
    assert audit(opsdb, checksums=True).findings == []
    with opsdb.session() as session:
        package = session.scalars(select(RawDataPackage).where(
            RawDataPackage.name == victim)).one()
        assert package.state == PackageState.ARCHIVED
    assert purge_package(opsdb, config, victim, now=utcnow() + LATER).deleted > 0


def test_a_copy_taken_away_after_the_audit_hashed_it_is_not_marked_present(
        config: Config, opsdb: OpsDB, lta: list[tuple[str, int, Path]],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A corrupt copy whose bytes were put back matches when the audit hashes it; then the file
    is taken away (the person who put it back moves it again) before the repair records it.
    The repair looks at the file again at that moment: not the file it hashed, nothing
    marked. Before, the copy became PRESENT with no file at its path."""
    import ccat_dt.audit as audit_module

    _, copy_id, path = lta[0]
    backup = tmp_path / "backup.tar"
    shutil.copy2(path, backup)
    flip_byte(path)
    audit(opsdb, checksums=True, repair=True, config=config)
    assert status(opsdb, copy_id) == CopyStatus.CORRUPT
    shutil.copy2(backup, path)  # put back by a person
    real = audit_module._compare_checksums

    def hashed_then_taken_away(walk: Any, location: Any, ssh: Any) -> None:
        real(walk, location, ssh)
        if path.exists() and any(b.record.copy_id == copy_id for b in walk.intact_again):
            path.rename(tmp_path / "moved-away.tar")

    monkeypatch.setattr(audit_module, "_compare_checksums", hashed_then_taken_away)
    report = audit(opsdb, checksums=True, repair=True, config=config)

    assert not path.exists()  # the storage
    assert [f.kind for f in report.findings if f.copy_id == copy_id] == ["intact_again"]
    assert report.repaired == []
    assert status(opsdb, copy_id) == CopyStatus.CORRUPT
    monkeypatch.undo()
    assert audit(opsdb, checksums=True, repair=True, config=config).repaired == []
    assert status(opsdb, copy_id) == CopyStatus.CORRUPT


def test_a_copy_put_back_after_the_audit_hashed_it_is_not_marked_corrupt(
        config: Config, opsdb: OpsDB, lta: list[tuple[str, int, Path]],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An LTA copy's bytes are bad when the audit hashes them; a person puts the copy back
    from a backup before the repair records what the audit found. The repair looks at the
    file again: not the one it hashed, so it is not marked (no needless repair from another
    archive). Before, a checksum mismatch stood while the size was the same, and the intact
    copy was marked CORRUPT."""
    import ccat_dt.audit as audit_module

    _, copy_id, path = lta[0]
    backup = tmp_path / "backup.tar"
    shutil.copy2(path, backup)
    flip_byte(path)
    real = audit_module._compare_checksums

    def hashed_then_put_back(walk: Any, location: Any, ssh: Any) -> None:
        real(walk, location, ssh)
        if any(b.record.copy_id == copy_id for b in walk.broken):
            shutil.copy2(backup, path)  # the person's restore, while the audit goes on

    monkeypatch.setattr(audit_module, "_compare_checksums", hashed_then_put_back)
    report = audit(opsdb, checksums=True, repair=True, config=config)

    assert path.read_bytes() == backup.read_bytes()  # the storage: intact
    assert [f.kind for f in report.findings if f.copy_id == copy_id] == ["changed"]
    assert report.repaired == []
    assert status(opsdb, copy_id) == CopyStatus.PRESENT
    monkeypatch.undo()
    assert audit(opsdb, checksums=True, repair=True, config=config).findings == []


def test_truncated_lta_copy_is_changed_and_repair_marks_it_corrupt(
        opsdb: OpsDB, lta: list[tuple[str, int, Path]]) -> None:
    _, copy_id, path = lta[1]
    size = path.stat().st_size
    os.truncate(path, size - 1)

    [finding] = audit(opsdb).findings
    assert (finding.kind, finding.copy_id) == ("changed", copy_id)
    assert f"recorded {size}" in finding.detail

    audit(opsdb, repair=True)
    assert status(opsdb, copy_id) == CopyStatus.CORRUPT
    assert path.stat().st_size == size - 1  # the bytes stay for an operator to look at


def test_flipped_byte_is_found_only_by_checksum(opsdb: OpsDB,
                                               lta: list[tuple[str, int, Path]]) -> None:
    _, copy_id, path = lta[0]
    flip_byte(path)

    assert audit(opsdb).findings == []  # same size: sizes alone cannot see it
    report = audit(opsdb, checksums=True)
    [finding] = report.findings
    assert (finding.kind, finding.copy_id) == ("changed", copy_id)
    assert "xxh3_128" in finding.detail

    audit(opsdb, checksums=True, repair=True)
    assert status(opsdb, copy_id) == CopyStatus.CORRUPT


def test_dark_file_is_reported_and_never_deleted(opsdb: OpsDB) -> None:
    stray = buffer_root(opsdb, "cologne") / "someone" / "notes.txt"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"not ours")

    for repair in (False, True):
        report = audit(opsdb, repair=repair)
        assert [(f.kind, f.path, f.copy_id) for f in report.findings] == [
            ("dark", str(stray), None)]
        assert report.repaired == []
    assert stray.read_bytes() == b"not ours"


def test_partial_file_is_removed_only_when_abandoned_and_nothing_is_in_flight(
        opsdb: OpsDB) -> None:
    root = buffer_root(opsdb, "ccat")
    part = root / "obs-0" / ".x.tar.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(b"half a tar")

    [finding] = audit(opsdb, repair=True).findings  # fresh: a transfer may be writing it
    assert finding.kind == "partial" and finding.path == str(part)
    assert "0.0 h ago" in finding.detail and part.exists()

    with opsdb.session() as session:
        location = get_location(session, "ccat", "buffer")
        operation = Operation(operation_type=OperationType.PACKAGING,
                              status=OperationStatus.IN_PROGRESS,
                              destination_location_id=location.id)
        session.add(operation)
    later = utcnow() + timedelta(hours=25)
    report = audit(opsdb, repair=True, now=later)
    assert [f.kind for f in report.findings] == ["partial"] and report.repaired == []
    assert part.exists()  # old, but something is working at this location

    with opsdb.session() as session:
        session.get_one(Operation, operation.id).status = OperationStatus.FAILED
    assert part.exists() and audit(opsdb, now=later).repaired == []  # no repair, no change
    report = audit(opsdb, repair=True, now=later)
    assert report.repaired == [f"removed abandoned temporary file {part}"]
    assert not part.exists()
    assert audit(opsdb).findings == []


def test_a_batchs_landed_file_is_in_flight_while_its_transfer_runs_then_a_temporary_file(
        opsdb: OpsDB, lta: list[tuple[str, int, Path]]) -> None:
    """A batched bbcp session lands its files, named as the packages, in a staging directory
    of its own beside their final names (`OBS/.bbcp-incoming.HASH/NAME`). While the package's
    transfer runs such a file is work in flight; one left once it ended (its link gone before
    it could remove it) is a temporary file left over ("partial", as `.NAME.part`), not
    unknown data. Before, both were "dark" files: an audit during a batch exited 1."""
    name, copy_id, final = lta[0]
    landed = final.parent / f"{STAGING_DIR}.0123456789abcdef" / final.name
    landed.parent.mkdir()
    landed.write_bytes(b"half a package")
    with opsdb.session() as session:
        copy = session.get_one(PackageCopy, copy_id)
        operation = Operation(operation_type=OperationType.TRANSFER,
                              status=OperationStatus.IN_PROGRESS,
                              destination_location_id=copy.location_id,
                              package_id=copy.package_id)
        claims.hold(operation)
        session.add(operation)
        session.flush()
        operation_id = operation.id
    claims.track([operation_id])
    try:
        during = audit(opsdb, repair=True)
    finally:
        claims.untrack([operation_id])
    assert [(f.kind, f.path) for f in during.findings] == [("in_flight", str(landed))], name
    assert during.problems == [] and during.repaired == []

    with opsdb.session() as session:
        session.get_one(Operation, operation_id).status = OperationStatus.FAILED
    [left] = audit(opsdb).findings
    assert (left.kind, left.path) == ("partial", str(landed))
    assert "temporary file" in left.detail, left.detail
    assert landed.read_bytes() == b"half a package"
    repaired = audit(opsdb, repair=True, now=utcnow() + timedelta(hours=25))
    assert repaired.repaired == [f"removed abandoned temporary file {landed}"]
    assert not landed.parent.exists()  # its staging directory with it


def test_a_scientists_temporary_file_at_a_processing_location_is_never_removed(
        opsdb: OpsDB) -> None:
    """Scientists' jobs write at a processing location: a `.NAME.part` there, however old, may
    be their only copy of something (a download, a job's output) and is never removed, only
    reported; the staging step's own temporary file there still is, once abandoned."""
    with opsdb.session() as session:
        root = Path(get_location(session, "ramses", "processing").root)
    theirs = root / "analysis" / ".spectra.fits.part"
    theirs.parent.mkdir(parents=True, exist_ok=True)
    theirs.write_bytes(b"a job's output, in no archive")
    ours = root / "stage-0a1b2c3d" / "..ccat-dt-staging.obs-0_chai-lfa_p00.tar.part"
    ours.parent.mkdir()
    ours.write_bytes(b"half a tar")

    report = audit(opsdb, repair=True, now=utcnow() + timedelta(hours=25))

    assert theirs.read_bytes() == b"a job's output, in no archive"  # the storage: kept
    assert report.repaired == [f"removed abandoned temporary file {ours}"]
    assert not ours.exists()
    assert [(f.kind, f.path) for f in report.findings if f.path == str(theirs)] == [
        ("dark", str(theirs))]


def test_deleted_copy_whose_file_reappears_is_stale(config: Config, opsdb: OpsDB,
                                                     lta: list[tuple[str, int, Path]]) -> None:
    name = lta[0][0]
    assert purge_package(opsdb, config, name, now=utcnow() + LATER).deleted > 0
    with opsdb.session() as session:
        copy_id, root, relative = session.execute(
            select(PackageCopy.id, DataLocation.root, PackageCopy.relative_path)
            .join(DataLocation, PackageCopy.location_id == DataLocation.id)
            .join(RawDataPackage, PackageCopy.package_id == RawDataPackage.id)
            .where(RawDataPackage.name == name, PackageCopy.status == CopyStatus.DELETED,
                   DataLocation.location_type == LocationType.BUFFER)
            .order_by(PackageCopy.id).limit(1)).one()
    back = Path(root) / relative
    back.parent.mkdir(parents=True, exist_ok=True)
    back.write_bytes(b"restored from somebody's backup")

    for repair in (False, True):
        [finding] = audit(opsdb, repair=repair).findings
        assert (finding.kind, finding.copy_id, finding.path) == ("stale_deleted", copy_id,
                                                                 str(back))
    assert back.exists() and status(opsdb, copy_id) == CopyStatus.DELETED


def test_without_repair_nothing_changes(config: Config, opsdb: OpsDB,
                                        lta: list[tuple[str, int, Path]]) -> None:
    assert purge_package(opsdb, config, lta[0][0], now=utcnow() + LATER).deleted > 0
    lta[0][2].unlink()  # lost
    flip_byte(lta[1][2])  # changed (checksum)
    os.truncate(lta[2][2], 10)  # changed (size)
    (buffer_root(opsdb, "us") / "stray.bin").write_bytes(b"?")  # dark
    (buffer_root(opsdb, "us") / ".y.tar.part").write_bytes(b"?")  # partial
    with opsdb.session() as session:
        deleted = session.scalars(select(PhysicalCopy).where(
            PhysicalCopy.status == CopyStatus.DELETED).limit(1)).one()
        stale = Path(deleted.location.root) / deleted.relative_path
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"back")  # stale_deleted
    data = config.resolve_root("sites")
    before_db, before_disk = db_snapshot(opsdb), disk_snapshot(data)

    report = audit(opsdb, checksums=True, now=utcnow() + timedelta(days=30))

    assert sorted(f.kind for f in report.findings) == [
        "changed", "changed", "dark", "lost", "partial", "stale_deleted"]
    assert report.repaired == []
    assert db_snapshot(opsdb) == before_db
    assert disk_snapshot(data) == before_disk


def test_unreachable_and_unmounted_locations_are_not_judged(
        opsdb: OpsDB, lta: list[tuple[str, int, Path]]) -> None:
    """Remote locations are audited over ssh (tests/test_audit_remote.py); one whose host
    cannot be reached is reported as not audited, like an unmounted local disk."""
    with opsdb.session() as session:
        cologne = session.scalars(select(DataLocation).join(Site).where(
            Site.short_name == "cologne", DataLocation.name == "lta")).one()
        cologne.host = "archive.invalid"  # never resolves: unreachable, without waiting
        us_root = Path(session.scalars(select(DataLocation.root).join(Site).where(
            Site.short_name == "us", DataLocation.name == "lta")).one())
    shutil.move(us_root, us_root.with_name("lta-elsewhere"))
    us_root.mkdir()  # an empty mount point: the archive file system is not mounted

    report = audit(opsdb, repair=True)

    skipped = [f for f in report.findings if f.kind == "skipped"]
    assert [f.location for f in skipped] == ["cologne/lta", "us/lta"]
    assert "not audited on archive.invalid" in skipped[0].detail
    assert "2 copies recorded there were not checked" in skipped[0].detail
    # the empty mount point lacks the marker `ccat-dt init` wrote: not audited, not "lost"
    assert "marker" in skipped[1].detail and "not checked" in skipped[1].detail
    assert [f for f in report.findings if f.kind == "lost"] == []
    assert report.repaired == []
    assert all(status(opsdb, copy_id) == CopyStatus.PRESENT for _, copy_id, _ in lta)


def test_lost_staged_copy_is_reported_but_not_frozen(opsdb: OpsDB) -> None:
    """Staged files are re-derivable from the archives; CORRUPT would freeze purges for good."""
    with opsdb.session() as session:
        processing = get_location(session, "ramses", "processing")
        raw = session.scalars(select(RawDataFile).order_by(RawDataFile.id).limit(1)).one()
        staged = RawDataFileCopy(raw_data_file_id=raw.id, location_id=processing.id,
                                 relative_path=f"request/{raw.relative_path}", size=raw.size,
                                 checksum=raw.checksum, status=CopyStatus.STAGED)
        session.add(staged)
        session.flush()
        copy_id, root = staged.id, Path(processing.root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "other.txt").write_bytes(b"x")  # the area is mounted; only the staged file is gone

    report = audit(opsdb, repair=True)

    assert sorted((f.kind, f.copy_id) for f in report.findings) == [("dark", None),
                                                                    ("lost", copy_id)]
    assert report.repaired == [] and status(opsdb, copy_id) == CopyStatus.STAGED


def test_repair_refuses_when_half_a_location_looks_missing(config: Config,
                                                           opsdb: OpsDB) -> None:
    """A broken mount must not trigger mass action: half of the source looks lost."""
    source = config.resolve_root("sites/ccat/instruments")
    files = files_under(source)
    assert len(files) == 4
    for path in files[:2]:
        path.unlink()
    before = db_snapshot(opsdb)

    report = audit(opsdb, repair=True, config=config)

    assert sorted(f.path for f in report.findings if f.kind == "lost") == \
        sorted(str(p) for p in files[:2])
    [refusal] = [f for f in report.findings if f.kind == "skipped" and "refusing" in f.detail]
    assert refusal.location == "ccat/instruments" and "2 of 4" in refusal.detail
    assert report.repaired == [] and db_snapshot(opsdb) == before  # nothing was acted on

"""Does OpsDB agree with the disks? A full comparison, location by location, and a safe repair.

OpsDB is the only basis for deletion, so a copy it believes PRESENT that the disk lost (or that
changed) must stop counting before the purge planner relies on it; files the disk has that OpsDB
does not know are reported for a human, never deleted or adopted. Each location root is walked
once and compared against one query of that location's copies, so the audit scales to millions
of files.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import CursorResult, select, update

from ccat_dt.checksums import ALGORITHM, hash_file
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PhysicalCopy,
    RawDataFile,
    RawDataPackage,
    Site,
    _aware,
    utcnow,
)
from ccat_dt.replicas import refresh_state
from ccat_dt.storage import MARKER, root_problem

LOST, CHANGED, DARK, PARTIAL, STALE_DELETED, SKIPPED = (
    "lost", "changed", "dark", "partial", "stale_deleted", "skipped")
ON_DISK = (CopyStatus.PRESENT, CopyStatus.STAGED)  # OpsDB promises these bytes are there
PARTIAL_MAX_AGE = timedelta(hours=24)  # older temporary files are abandoned, not in flight


@dataclass(frozen=True)
class Finding:
    kind: str  # lost | changed | dark | partial | stale_deleted | skipped
    location: str  # site/location
    path: str  # absolute
    copy_id: int | None
    detail: str


@dataclass
class AuditReport:
    findings: list[Finding]
    checked_copies: int
    scanned_files: int
    repaired: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        """Disagreements; "skipped" only says what the audit could not look at."""
        return [f for f in self.findings if f.kind != SKIPPED]


@dataclass(frozen=True)
class _Recorded:
    copy_id: int
    status: CopyStatus
    size: int
    checksum: str
    package_id: int | None


@dataclass(frozen=True)
class _Location:
    id: int
    label: str
    root: str
    host: str | None
    writes_temporaries: bool = True  # False at SOURCE: instruments write there, we never do


@dataclass
class _Walk:
    """What one location's audit found, before any repair."""

    findings: list[Finding] = field(default_factory=list)
    broken: list[tuple[Finding, _Recorded, str]] = field(default_factory=list)  # + why
    partial: list[tuple[Finding, float]] = field(default_factory=list)  # with mtime
    checked: int = 0
    scanned: int = 0


# A broken mount must not trigger mass action: above this share of a location's copies
# looking lost or changed, repair refuses (policies.audit_max_broken_share).
DEFAULT_MAX_BROKEN_SHARE = 0.1


def is_temporary(name: str) -> bool:
    """`.NAME.part`: what transports and packaging write before the atomic rename."""
    return name.startswith(".") and name.endswith(".part") and len(name) > len("..part")


def audit(opsdb: OpsDB, *, checksums: bool = False, repair: bool = False,
          now: datetime | None = None, config: Config | None = None) -> AuditReport:
    """Compare every local location's copies in OpsDB with its files on disk.

    `checksums` re-reads the bytes of every PRESENT/STAGED copy (slow; sizes alone otherwise).
    `repair` marks lost or changed PRESENT copies CORRUPT, which freezes every purge of their
    package until a good copy replaces them, and removes temporary files abandoned for over
    24 hours (never at a SOURCE location: nothing of ours writes there, so a file named like a
    temporary one is an instrument's, reported as unknown and left alone); nothing else is
    changed, and without `repair` nothing at all. With `config`, the
    state of a package whose copy was marked corrupt is re-derived (ARCHIVED may fall back).
    """
    now = _aware(now or utcnow())
    with opsdb.session() as session:
        locations = [_Location(id_, f"{site}/{name}", root, host, kind != LocationType.SOURCE)
                     for id_, site, name, root, host, kind
                     in session.execute(select(DataLocation.id, Site.short_name, DataLocation.name,
                                               DataLocation.root, DataLocation.host,
                                               DataLocation.location_type)
                                        .join(Site).order_by(DataLocation.id)).all()]
    local_roots = {os.path.normpath(loc.root) for loc in locations if loc.host is None}
    report = AuditReport(findings=[], checked_copies=0, scanned_files=0, repaired=[])
    corrupted: set[int] = set()
    for location in locations:
        if location.host is not None:
            report.findings.append(Finding(
                SKIPPED, location.label, location.root, None,
                f"remote location on {location.host}: remote audit is not implemented yet"))
            continue
        walk = _audit_location(opsdb, location, local_roots, checksums=checksums, now=now)
        report.findings += walk.findings
        report.checked_copies += walk.checked
        report.scanned_files += walk.scanned
        share = (config.settings.policies.audit_max_broken_share if config is not None
                 else DEFAULT_MAX_BROKEN_SHARE)
        if repair and len(walk.broken) > 1 and len(walk.broken) > share * max(walk.checked, 1):
            report.findings.append(Finding(
                SKIPPED, location.label, location.root, None,
                f"refusing to repair: {len(walk.broken)} of {walk.checked} copies look lost or "
                f"changed (more than {share:.0%}); check that the disk is mounted and healthy, "
                "then repair"))
        elif repair:
            _repair(opsdb, location, walk, report.repaired, corrupted)
    if corrupted and config is not None:
        with opsdb.session() as session:
            for package_id in sorted(corrupted):
                refresh_state(session, config, session.get_one(RawDataPackage, package_id))
    return report


def _audit_location(opsdb: OpsDB, location: _Location, local_roots: set[str], *,
                    checksums: bool, now: datetime) -> _Walk:
    live: dict[str, list[_Recorded]] = defaultdict(list)
    deleted: dict[str, int] = {}
    with opsdb.session() as session:
        rows = session.execute(
            select(PhysicalCopy.id, PhysicalCopy.status, PhysicalCopy.relative_path,
                   PhysicalCopy.size, PhysicalCopy.checksum, PhysicalCopy.package_id,
                   RawDataFile.package_id)
            .outerjoin(RawDataFile, PhysicalCopy.raw_data_file_id == RawDataFile.id)
            .where(PhysicalCopy.location_id == location.id).order_by(PhysicalCopy.id)).all()
        busy = session.scalar(select(Operation.id).where(
            Operation.destination_location_id == location.id,
            Operation.status == OperationStatus.IN_PROGRESS).limit(1)) is not None
    for copy_id, status, relative, size, checksum, package_id, file_package_id in rows:
        key = os.path.normpath(relative)
        if status == CopyStatus.DELETED:
            deleted[key] = copy_id  # ordered by id: the newest deletion wins
        else:
            live[key].append(_Recorded(copy_id, status, size, checksum,
                                       package_id or file_package_id))
    walk = _Walk()
    root = os.path.normpath(location.root)
    expected = sum(1 for records in live.values() for r in records if r.status in ON_DISK)
    if not os.path.isdir(root):
        if expected == 0:
            return walk  # nothing recorded there yet (e.g. a processing area never used)
        walk.findings.append(Finding(
            SKIPPED, location.label, root, None,
            f"location root is missing or not a directory (not mounted?): {expected} "
            "copies recorded on disk there were not checked"))
        return walk
    if expected and (problem := root_problem(Path(root))):
        walk.findings.append(Finding(SKIPPED, location.label, root, None,
                                     f"{problem}: {expected} copies recorded there were not "
                                     "checked"))
        return walk

    seen: set[str] = set()
    unreadable: list[str] = []
    stack = [("", root)]
    while stack:
        prefix, directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                listing = list(entries)
        except OSError as exc:
            unreadable.append(prefix)
            walk.findings.append(Finding(SKIPPED, location.label, directory, None,
                                         f"cannot list directory: {exc}"))
            continue
        for entry in listing:
            relative = f"{prefix}{entry.name}"
            if relative == MARKER:
                continue  # the location root's own marker (storage.py)
            if entry.is_dir(follow_symlinks=False):
                if os.path.normpath(entry.path) not in local_roots:  # nested location: own audit
                    stack.append((f"{relative}/", entry.path))
                continue
            walk.scanned += 1
            if relative in live:
                seen.add(relative)
                _check(walk, location, entry, live[relative], checksums)
            elif is_temporary(entry.name) and location.writes_temporaries:
                _partial(walk, location, entry, now, busy)
            elif relative in deleted:
                walk.findings.append(Finding(
                    STALE_DELETED, location.label, entry.path, deleted[relative],
                    f"recorded deleted, still on disk ({_size(entry)} bytes)"))
            else:
                in_flight = "; an operation is in progress here, it may be in flight" if busy \
                    else ""
                walk.findings.append(Finding(
                    DARK, location.label, entry.path, None,
                    f"{_size(entry)} bytes, not referred to by any copy in OpsDB{in_flight}"))

    missing = [(relative, r) for relative, records in live.items() if relative not in seen
               for r in records if r.status in ON_DISK
               and not any(relative.startswith(p) for p in unreadable)]
    walk.checked += len(missing)
    mount_note = ""
    if missing and len(missing) == expected and walk.scanned == 0:
        mount_note = "; the whole location root is empty (not mounted?): not repaired"
    for relative, record in missing:
        finding = Finding(LOST, location.label, os.path.join(root, relative), record.copy_id,
                          f"recorded {record.status.value} ({record.size} bytes), missing on disk"
                          f"{mount_note}")
        walk.findings.append(finding)
        if not mount_note:
            walk.broken.append((finding, record, LOST))
    return walk


def _check(walk: _Walk, location: _Location, entry: os.DirEntry[str],
           records: list[_Recorded], checksums: bool) -> None:
    """Size (and optionally checksum) of a file against each copy OpsDB says is on disk there."""
    digest: str | None = None
    for record in records:
        if record.status not in ON_DISK:
            continue  # CORRUPT and deletions in progress: OpsDB promises nothing about them
        walk.checked += 1
        size = _size(entry)
        problem, why = None, "size"
        if entry.is_symlink():
            problem = f"a symlink where the recorded file should be (to {_target(entry)})"
        elif size != record.size:
            problem = f"size on disk {size} bytes, recorded {record.size}"
        elif checksums:
            try:
                digest = digest or hash_file(Path(entry.path))[0]
            except OSError as exc:
                problem, why = f"cannot read: {exc}", "unreadable"
            else:
                if digest != record.checksum:
                    problem, why = (f"{ALGORITHM} on disk {digest}, recorded {record.checksum}",
                                    "checksum")
        if problem is not None:
            finding = Finding(CHANGED, location.label, entry.path, record.copy_id, problem)
            walk.findings.append(finding)
            walk.broken.append((finding, record, why))


def _partial(walk: _Walk, location: _Location, entry: os.DirEntry[str], now: datetime,
             busy: bool) -> None:
    try:
        mtime = entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return  # gone since the listing: finished or cleaned up
    age = now - datetime.fromtimestamp(mtime, UTC)
    hours = age.total_seconds() / 3600
    if age <= PARTIAL_MAX_AGE:
        note = "recent: probably a transfer in flight"
    elif busy:
        note = "an operation is in progress at this location: left alone"
    else:
        note = "abandoned: removable with repair"
    finding = Finding(PARTIAL, location.label, entry.path, None,
                      f"temporary file, {_size(entry)} bytes, last written {hours:.1f} h ago; "
                      f"{note}")
    walk.findings.append(finding)
    if age > PARTIAL_MAX_AGE and not busy:
        walk.partial.append((finding, mtime))


def _target(entry: os.DirEntry[str]) -> str:
    try:
        return os.readlink(entry.path)
    except OSError:
        return "?"


def _size(entry: os.DirEntry[str]) -> int:
    try:
        return entry.stat().st_size
    except OSError:
        return -1  # e.g. a dangling symlink: never equal to a recorded size


def _repair(opsdb: OpsDB, location: _Location, walk: _Walk, repaired: list[str],
            corrupted: set[int]) -> None:
    for finding, record, why in walk.broken:
        if record.status != CopyStatus.PRESENT:
            continue  # staged copies come back from the archives; freezing purges gains nothing
        if not _still_broken(finding.path, record, why):
            continue
        with opsdb.session() as session:
            # Compare-and-set: a deletion or repair that got there first wins.
            result = session.execute(update(PhysicalCopy).where(
                PhysicalCopy.id == record.copy_id, PhysicalCopy.status == CopyStatus.PRESENT)
                .values(status=CopyStatus.CORRUPT))
            if not isinstance(result, CursorResult) or result.rowcount != 1:
                continue
            session.add(Operation(
                operation_type=OperationType.VERIFICATION, status=OperationStatus.FAILED,
                package_id=record.package_id, copy_id=record.copy_id,
                destination_location_id=location.id, error=f"{finding.kind}: {finding.detail}",
                reason="audit: OpsDB and disk disagree", started_at=utcnow(),
                finished_at=utcnow()))
        if record.package_id is not None:
            corrupted.add(record.package_id)
        repaired.append(f"copy {record.copy_id} at {location.label} marked corrupt "
                        f"({finding.kind}: {finding.path})")
    for finding, mtime in walk.partial:
        path = Path(finding.path)
        try:
            if path.lstat().st_mtime != mtime:
                continue  # written to since the walk: in flight after all
            path.unlink()
        except OSError:
            continue
        repaired.append(f"removed abandoned temporary file {finding.path}")


def _still_broken(path: str, record: _Recorded, why: str) -> bool:
    """Re-check the disk just before recording, so a file that reappeared is not condemned.

    A checksum mismatch is not re-read (too slow); it stands while the size is unchanged."""
    if why == LOST:
        return not os.path.isfile(path)
    if why == "unreadable":
        return False  # an I/O error may be passing; only reported
    try:
        size = os.stat(path).st_size
    except OSError:
        return False  # gone since the walk: the next audit reports it as lost
    return size != record.size if why == "size" else size == record.size

"""Does OpsDB agree with the disks? A full comparison, location by location, and a safe repair.

OpsDB is the only basis for deletion, so a copy it believes PRESENT that the disk lost (or that
changed) must stop counting before the purge planner relies on it; files the disk has that OpsDB
does not know are reported for a human, never deleted or adopted. Each location root is listed
once (a remote one in one ssh round trip, storage.listing) and compared against one query of
that location's copies by the same function, local or remote, so the audit scales to millions
of files and costs O(locations) round trips, not O(files); checksums are computed where the
files are, in batches (storage.look). A location that cannot be looked at is reported as
"skipped" (not audited), never as clean. An S3 location (objectstore) is listed by prefix, its
objects re-read for checksums, and its unfinished multipart uploads reported as partial.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from ccat_dt import claims
from ccat_dt.checksums import ALGORITHM
from ccat_dt.config import Config
from ccat_dt.objectstore import Stores, is_object_root
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PhysicalCopy,
    RawDataFile,
    RawDataPackage,
    Site,
    _aware,
    utcnow,
)
from ccat_dt.packages import lock_package, not_the_package, package_path
from ccat_dt.replicas import refresh_state
from ccat_dt.staged_files import SCRATCH, scratch_names
from ccat_dt.storage import (
    Entry,
    Listing,
    Seen,
    StorageUnavailable,
    Wanted,
)
from ccat_dt.transports.base import SshSettings, temporary_name
from ccat_dt.transports.bbcp import staged_final

LOST, CHANGED, DARK, PARTIAL, STALE_DELETED, SKIPPED, INTACT_AGAIN, IN_FLIGHT = (
    "lost", "changed", "dark", "partial", "stale_deleted", "skipped", "intact_again",
    "in_flight")
# What work in flight looks like before OpsDB records it: a file that is there (a temporary
# file, a tar landed but not recorded, a new file at a path whose old copy was deleted, a
# quarantined copy's path written over by its repair).
APPEARING = (PARTIAL, DARK, STALE_DELETED, INTACT_AGAIN)
# The operations that write at their destination location, each while its process holds it.
WRITERS = (OperationType.PACKAGING, OperationType.TRANSFER, OperationType.ARCHIVE,
           OperationType.STAGING)
ON_DISK = (CopyStatus.PRESENT, CopyStatus.STAGED)  # OpsDB promises these bytes are there
PARTIAL_MAX_AGE = timedelta(hours=24)  # older temporary files are abandoned, not in flight
# Checksums are computed on the files' host: one round trip per batch, bounded in count and
# bytes so that a batch stays well inside storage.look's time limit.
HASH_BATCH_FILES = 200
HASH_BATCH_BYTES = 200 * 10**9


@dataclass(frozen=True)
class Finding:
    kind: str  # lost | changed | dark | partial | stale_deleted | skipped | intact_again |
    # in_flight (a file an operation is writing now: work, not a problem)
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
        """Disagreements; "skipped" only says what the audit could not look at, "in_flight"
        what the pipeline is writing now."""
        return [f for f in self.findings if f.kind not in (SKIPPED, IN_FLIGHT)]


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
    kind: LocationType = LocationType.BUFFER
    # How the root is looked at: disk (local or over ssh) or an object store (s3://...).
    stores: Stores = field(default_factory=lambda: Stores({}), compare=False)

    def made_temporary(self, relative: str) -> bool:
        """Whether the file at `relative` is a temporary file of ours: `.NAME.part`, or a
        file a batched bbcp session landed in its staging directory. Instruments write at a
        SOURCE and scientists' jobs at a PROCESSING location, so a `.NAME.part` there may be
        their only copy of something: at a SOURCE nothing is ours, at a PROCESSING location
        only the staging step's scratch tar (staged_files.SCRATCH)."""
        name = relative.rsplit("/", 1)[-1]
        if self.kind == LocationType.SOURCE:
            return False
        if self.kind == LocationType.PROCESSING:
            return is_temporary(name) and name[1:].startswith(SCRATCH)
        return is_temporary(name) or staged_final(relative) is not None

    @property
    def root_path(self) -> str:
        """The root as findings name it (a directory normalised; an s3:// URL as it is)."""
        return self.root if is_object_root(self.root) else os.path.normpath(self.root)


@dataclass
class _Expected:
    """What OpsDB says about one location: live copies and deletions by relative path."""

    live: dict[str, list[_Recorded]]
    deleted: dict[str, int]
    busy: bool  # an operation is writing there now

    @property
    def on_disk(self) -> int:
        return sum(1 for records in self.live.values() for r in records if r.status in ON_DISK)


@dataclass(frozen=True)
class _Broken:
    finding: Finding
    record: _Recorded
    relative_path: str
    why: str  # lost | size | symlink | checksum | unreadable | intact
    seen: Seen | None = None  # the file as it was hashed (intact, checksum): the one judged


@dataclass
class _Walk:
    """What one location's audit found, before any repair."""

    findings: list[Finding] = field(default_factory=list)
    broken: list[_Broken] = field(default_factory=list)
    partial: list[tuple[Finding, float]] = field(default_factory=list)  # with mtime
    uploads: list[Entry] = field(default_factory=list)  # abandoned multipart uploads
    to_hash: list[tuple[Entry, list[_Recorded]]] = field(default_factory=list)
    # CORRUPT copies whose bytes were read and match their checksum again (put back by a
    # person, or quarantined while their disk was away): PRESENT again with repair.
    intact_again: list[_Broken] = field(default_factory=list)
    checked: int = 0
    scanned: int = 0


# A broken mount must not trigger mass action: above this share of a location's copies
# looking lost or changed, repair refuses (policies.audit_max_broken_share).
DEFAULT_MAX_BROKEN_SHARE = 0.1


def is_temporary(name: str) -> bool:
    """`.NAME.part`: what transports and packaging write before the atomic rename."""
    return name.startswith(".") and name.endswith(".part") and len(name) > len("..part")


def audit(opsdb: OpsDB, *, checksums: bool = False, repair: bool = False,
          now: datetime | None = None, config: Config | None = None,
          ssh: SshSettings | None = None) -> AuditReport:
    """Compare every location's copies in OpsDB with its files, local or over ssh.

    `checksums` re-reads the bytes of every PRESENT/STAGED copy where it is (slow; sizes alone
    otherwise), and of every CORRUPT copy of the recorded size: one whose bytes match again (a
    copy restored from a backup) is reported. `repair` marks lost or changed PRESENT copies
    CORRUPT, which freezes every purge of their package until a good copy replaces them, marks
    CORRUPT copies whose bytes matched again PRESENT (a LOST package is lifted; not a tar that
    is no longer its package's, e.g. built before `exclude` took a file out, nor a file
    replaced or removed since it was hashed), and removes
    local temporary files abandoned for over 24 hours (never at a SOURCE location: nothing of
    ours writes there, so a file named like a temporary one is an instrument's, reported as
    unknown and left alone; at a PROCESSING location only the staging step's, the others
    being scientists'; nor on a remote host: those are only reported, to be removed by
    hand, because a deletion over ssh would need its own symlink-safe re-check); nothing else is
    changed, and without `repair` nothing at all. With `config`, the state of a package whose
    copy was marked corrupt or present again is re-derived (ARCHIVED may fall back, LOST be
    lifted), and remote hosts are reached with the config's ssh settings unless `ssh` is given.
    """
    now = _aware(now or utcnow())
    if ssh is None:
        from ccat_dt.transports.factory import ssh_settings  # transports pull in much

        ssh = ssh_settings(config) if config is not None else SshSettings()
    stores = Stores.of(config)
    with opsdb.session() as session:
        locations = [_Location(id_, f"{site}/{name}", root, host, kind,
                               stores)
                     for id_, site, name, root, host, kind
                     in session.execute(select(DataLocation.id, Site.short_name, DataLocation.name,
                                               DataLocation.root, DataLocation.host,
                                               DataLocation.location_type)
                                        .join(Site).order_by(DataLocation.id)).all()]
    report = AuditReport(findings=[], checked_copies=0, scanned_files=0, repaired=[])
    changed_packages: set[int] = set()
    for location in locations:
        walk = _audit_location(opsdb, location, _nested(location, locations), ssh,
                               checksums=checksums, now=now)
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
            report.findings += _repair(opsdb, location, ssh, walk, report.repaired,
                                       changed_packages)
    if changed_packages and config is not None:
        with opsdb.session() as session:
            for package_id in sorted(changed_packages):
                refresh_state(session, config, session.get_one(RawDataPackage, package_id))
    return report


def _nested(location: _Location, locations: list[_Location]) -> set[str]:
    """Other location roots on the same host below this one (relative): audited on their own."""
    root = os.path.normpath(location.root)
    return {os.path.relpath(os.path.normpath(other.root), root) for other in locations
            if other.host == location.host and other.id != location.id
            and os.path.normpath(other.root).startswith(f"{root}/")}


def _expected(opsdb: OpsDB, location: _Location) -> _Expected:
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
    return _Expected(live, deleted, busy)


def _audit_location(opsdb: OpsDB, location: _Location, nested: set[str], ssh: SshSettings, *,
                    checksums: bool, now: datetime) -> _Walk:
    since = utcnow()  # before OpsDB is read and the location listed
    expected = _expected(opsdb, location)
    root = location.root_path
    where = f" on {location.host}" if location.host else ""
    if location.host is None and not os.path.isdir(root) and expected.on_disk == 0 \
            and not is_object_root(root):
        return _Walk()  # nothing recorded there yet (e.g. a processing area never used)
    try:
        found = location.stores.listing(root, location.host, ssh, nested)
    except StorageUnavailable as exc:
        walk = _Walk()
        unmarked_unused = location.host is not None and expected.on_disk == 0 \
            and "marker" in str(exc)
        if not unmarked_unused:  # (a remote area never used, as the missing local one above)
            walk.findings.append(Finding(
                SKIPPED, location.label, root, None,
                f"not audited{where}: {exc}: {expected.on_disk} copies recorded there were not "
                "checked"))
        return walk
    walk = _compare(location, expected, found, now)
    if checksums and walk.to_hash:
        _compare_checksums(walk, location, ssh)
    _drop_overtaken(opsdb, location, walk)
    _drop_superseded(opsdb, walk)
    _settle(opsdb, location, walk, since)
    return walk


def _superseded(session: Session, copy_id: int) -> str | None:
    """Why a (CORRUPT) copy is not its package's tar now, whatever its bytes (a file was
    taken out of the package, or another build replaced it: packages.not_the_package)."""
    copy = session.get(PhysicalCopy, copy_id)
    return not_the_package(copy.package, copy) if isinstance(copy, PackageCopy) else None


def _taken_away(session: Session, copy_ids: set[int]) -> set[int]:
    """Copies whose empty path a purge found and accepted (a changed source a person took
    away): PRESENT until that purge records their deletion under its certificate, not lost."""
    from ccat_dt.reaper import taken_away  # the deletion side pulls in the transports

    return taken_away(session, copy_ids)


def _drop_superseded(opsdb: OpsDB, walk: _Walk) -> None:
    """A quarantined tar whose bytes match its own checksum is not "intact again" when it is
    not the package any more (built before a file was taken out, or by a build that was
    quarantined): OpsDB rightly holds it CORRUPT until the rebuild replaces it."""
    if not walk.intact_again:
        return
    with opsdb.session() as session:
        stale = {b.record.copy_id for b in walk.intact_again
                 if _superseded(session, b.record.copy_id) is not None}
    walk.intact_again = [b for b in walk.intact_again if b.record.copy_id not in stale]
    walk.findings = [f for f in walk.findings
                     if not (f.kind == INTACT_AGAIN and f.copy_id in stale)]


def _drop_overtaken(opsdb: OpsDB, location: _Location, walk: _Walk) -> None:
    """Findings that OpsDB has caught up with since it was read for this location (a purge
    deleted the copy, a transfer recorded its new file meanwhile): what was seen then was
    work in progress, not a fault; the audit of a running system reports none of it."""
    ids = {f.copy_id for f in walk.findings if f.kind in (LOST, CHANGED) and f.copy_id}
    quarantined = {f.copy_id for f in walk.findings if f.kind == INTACT_AGAIN and f.copy_id}
    dark = {os.path.relpath(f.path, location.root_path) for f in walk.findings
            if f.kind in (DARK, STALE_DELETED)}
    if not ids and not dark and not quarantined:
        return
    with opsdb.session() as session:
        gone = {copy_id for copy_id, status in session.execute(
            select(PhysicalCopy.id, PhysicalCopy.status).where(
                PhysicalCopy.id.in_(ids | quarantined)))
            if (copy_id in ids and status not in ON_DISK)
            or (copy_id in quarantined and status != CopyStatus.CORRUPT)} \
            if ids or quarantined else set()
        gone |= _taken_away(session, {f.copy_id for f in walk.findings
                                      if f.kind == LOST and f.copy_id} - gone)
        recorded = {os.path.normpath(path) for path in session.scalars(
            select(PhysicalCopy.relative_path).where(
                PhysicalCopy.location_id == location.id, PhysicalCopy.status.in_(ON_DISK),
                PhysicalCopy.relative_path.in_(dark)))} if dark else set()

    def overtaken(finding: Finding) -> bool:
        return (finding.kind in (LOST, CHANGED, INTACT_AGAIN) and finding.copy_id in gone) or (
            finding.kind in (DARK, STALE_DELETED)
            and os.path.relpath(finding.path, location.root_path) in recorded)

    walk.findings = [f for f in walk.findings if not overtaken(f)]
    walk.broken = [b for b in walk.broken if not overtaken(b.finding)]


def _settle(opsdb: OpsDB, location: _Location, walk: _Walk, since: datetime) -> None:
    """Work in flight told from faults at the moment it is reported, after the listing: a
    file an operation is writing there now (a tar half written, or landed and not yet
    recorded; a staged file moved into place) is in flight: reported as such, not a problem,
    never repaired. One whose operation ended since the audit began looking at the location
    was in flight while it was listed (renamed, recorded or removed since): not reported."""
    if not any(f.kind in APPEARING for f in walk.findings):
        return
    writers = _writers(opsdb, location, since)

    def settled(finding: Finding) -> Finding | None:
        writer = (writers(os.path.relpath(finding.path, location.root_path))
                  if finding.kind in APPEARING else None)
        if writer is None:
            return finding
        who, live = writer
        return Finding(IN_FLIGHT, finding.location, finding.path, finding.copy_id,
                       f"being written by {who}, not recorded yet: work in flight, not a "
                       "problem") if live else None
    walk.findings = [f for f in map(settled, walk.findings) if f is not None]
    reported = set(walk.findings)
    walk.partial = [(f, mtime) for f, mtime in walk.partial if f in reported]
    walk.uploads = [u for u in walk.uploads if any(
        f.kind == PARTIAL and f.path == os.path.join(location.root_path, u.relative_path)
        for f in reported)]
    walk.intact_again = [b for b in walk.intact_again if b.finding in reported]


def _writers(opsdb: OpsDB, location: _Location,
             since: datetime) -> Callable[[str], tuple[str, bool] | None]:
    """Who writes a path (relative) at the location: (who, True) for an operation in progress
    there whose process holds it now (claims.stale), (who, False) for one that ended since
    `since`; None for any other path. Each writes its package's tar and the tar's temporary
    name; staging, the package's directory and scratch in a request's directory."""
    now = utcnow()
    tars: dict[str, tuple[str, bool]] = {}
    staged: dict[str, tuple[str, bool]] = {}
    with opsdb.session() as session:
        for operation in session.scalars(select(Operation).where(
                Operation.destination_location_id == location.id,
                Operation.operation_type.in_(WRITERS),
                (Operation.status == OperationStatus.IN_PROGRESS)
                | (Operation.finished_at >= since)).order_by(Operation.id)):
            live = operation.status == OperationStatus.IN_PROGRESS
            if operation.package is None or live and claims.stale(operation, now) is not None:
                continue  # (a process gone: its files are left over, not in flight)
            name = operation.package.name
            writer = (f"{operation.operation_type.value} operation {operation.id} of {name} "
                      f"({claims.holder(operation)})", live)
            if operation.operation_type == OperationType.STAGING:
                tar, scratch = scratch_names(Path(), "", name)
                temporary = temporary_name(PurePosixPath(tar.name)).name
                for part in (name, tar.name, scratch.name, temporary):
                    staged[part] = writer if live else staged.get(part, writer)
            else:
                path = PurePosixPath(package_path(operation.package))
                for part in (str(path), str(temporary_name(path))):
                    tars[part] = writer if live else tars.get(part, writer)

    def writes(relative: str) -> tuple[str, bool] | None:
        parts = relative.split("/")
        return (tars.get(staged_final(relative) or relative)  # (a batch's landed file)
                or (staged.get(parts[1]) if len(parts) > 1 else None))
    return writes


def _compare(location: _Location, expected: _Expected, found: Listing, now: datetime) -> _Walk:
    """The findings of one location: its listing (local or remote) against OpsDB."""
    walk = _Walk()
    root = location.root_path
    for prefix, problem in found.unreadable:
        walk.findings.append(Finding(SKIPPED, location.label, os.path.join(root, prefix), None,
                                     problem))
    unreadable = [prefix for prefix, _ in found.unreadable]
    seen: set[str] = set()
    busy = expected.busy
    for entry in found.entries:
        relative = entry.relative_path
        path = os.path.join(root, relative)
        walk.scanned += 1
        if relative in expected.live:
            seen.add(relative)
            _check(walk, location, entry, expected.live[relative])
        elif location.made_temporary(relative):
            _partial(walk, location, entry, now, busy)
        elif relative in expected.deleted:
            walk.findings.append(Finding(
                STALE_DELETED, location.label, path, expected.deleted[relative],
                f"recorded deleted, still on disk ({entry.size} bytes)"))
        else:
            walk.findings.append(Finding(
                DARK, location.label, path, None,
                f"{entry.size} bytes, not referred to by any copy in OpsDB"))
    for upload in found.uploads:  # an object store's temporary files
        _partial(walk, location, upload, now, busy)

    missing = [(relative, r) for relative, records in expected.live.items()
               if relative not in seen for r in records if r.status in ON_DISK
               and not any(relative.startswith(p) for p in unreadable)]
    walk.checked += len(missing)
    mount_note = ""
    if missing and len(missing) == expected.on_disk and walk.scanned == 0:
        # (a listing needs the marker: the disk is the one `ccat-dt init` marked, or one
        # marked since by mistake)
        mount_note = ("; the location root holds nothing but its marker (a new or other disk "
                      "marked by `ccat-dt init`?): not repaired")
    for relative, record in missing:
        finding = Finding(LOST, location.label, os.path.join(root, relative), record.copy_id,
                          f"recorded {record.status.value} ({record.size} bytes), missing on disk"
                          f"{mount_note}")
        walk.findings.append(finding)
        if not mount_note:
            walk.broken.append(_Broken(finding, record, relative, LOST))
    return walk


def _check(walk: _Walk, location: _Location, entry: Entry, records: list[_Recorded]) -> None:
    """Size against each copy OpsDB says is on disk there; files to re-read are noted."""
    on_disk = [r for r in records if r.status in ON_DISK]  # CORRUPT, deleting: no promise
    path = os.path.join(location.root_path, entry.relative_path)
    hashable = []
    for record in on_disk:
        walk.checked += 1
        problem, why = None, "size"
        if entry.symlink:
            problem, why = (f"a symlink where the recorded file should be (to {entry.target})",
                            "symlink")
        elif entry.size != record.size:
            problem = f"size on disk {entry.size} bytes, recorded {record.size}"
        else:
            hashable.append(record)
        if problem is not None:
            finding = Finding(CHANGED, location.label, path, record.copy_id, problem)
            walk.findings.append(finding)
            walk.broken.append(_Broken(finding, record, entry.relative_path, why))
    hashable += [r for r in records if r.status == CopyStatus.CORRUPT
                 and not entry.symlink and entry.size == r.size]
    if hashable:
        walk.to_hash.append((entry, hashable))


def _batches(items: list[tuple[Entry, list[_Recorded]]]
             ) -> Iterator[list[tuple[Entry, list[_Recorded]]]]:
    batch: list[tuple[Entry, list[_Recorded]]] = []
    size = 0
    for item in items:
        if batch and (len(batch) >= HASH_BATCH_FILES or size + item[0].size > HASH_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item[0].size
    if batch:
        yield batch


def _compare_checksums(walk: _Walk, location: _Location, ssh: SshSettings) -> None:
    """Re-read the files whose size matched, on their host, one round trip per batch."""
    root = location.root_path
    done = 0
    for batch in _batches(walk.to_hash):
        try:
            seen = location.stores.look(root, location.host, ssh,
                        [Wanted(entry.relative_path, rehash=True) for entry, _ in batch])
        except StorageUnavailable as exc:
            left = sum(len(records) for _, records in walk.to_hash[done:])
            walk.findings.append(Finding(
                SKIPPED, location.label, root, None,
                f"not audited: the checksums of {left} copies were not checked: {exc}"))
            return
        done += len(batch)
        for (entry, records), now_seen in zip(batch, seen, strict=True):
            for record in records:
                _judge_checksum(walk, location, entry, record, now_seen)


def _judge_checksum(walk: _Walk, location: _Location, entry: Entry, record: _Recorded,
                    seen: Seen) -> None:
    if record.status == CopyStatus.CORRUPT:
        if seen.problem is None and seen.size == record.size and seen.checksum == record.checksum:
            finding = Finding(INTACT_AGAIN, location.label,
                              os.path.join(location.root_path, entry.relative_path),
                              record.copy_id, "recorded corrupt, its bytes match the recorded "
                              f"{ALGORITHM} again: PRESENT again with repair")
            walk.findings.append(finding)
            walk.intact_again.append(_Broken(finding, record, entry.relative_path, "intact",
                                             seen))
        return
    problem, why = None, "checksum"
    if seen.problem is not None:
        problem, why = f"cannot read: {seen.problem}", "unreadable"
    elif seen.size != record.size:
        problem, why = f"size on disk {seen.size} bytes, recorded {record.size}", "size"
    elif seen.checksum != record.checksum:
        problem = f"{ALGORITHM} on disk {seen.checksum}, recorded {record.checksum}"
    if problem is not None:
        path = os.path.join(location.root_path, entry.relative_path)
        finding = Finding(CHANGED, location.label, path, record.copy_id, problem)
        walk.findings.append(finding)
        walk.broken.append(_Broken(finding, record, entry.relative_path, why,
                                   seen if why == "checksum" else None))


def _partial(walk: _Walk, location: _Location, entry: Entry, now: datetime,
             busy: bool) -> None:
    age = now - datetime.fromtimestamp(entry.mtime, UTC)
    hours = max(age.total_seconds(), 0.0) / 3600  # written after `now` was taken: just now
    remote = location.host is not None
    if is_object_root(location.root):
        _unfinished_upload(walk, location, entry, age, busy)
        return
    if age <= PARTIAL_MAX_AGE:
        note = "recent, but no operation is writing it now (left by an attempt that ended)"
    elif busy:
        note = "an operation is in progress at this location: left alone"
    elif remote:
        note = f"abandoned: remove it by hand on {location.host} (repair leaves remote files)"
    else:
        note = "abandoned: removable with repair"
    path = os.path.join(location.root_path, entry.relative_path)
    finding = Finding(PARTIAL, location.label, path, None,
                      f"temporary file, {entry.size} bytes, last written {hours:.1f} h ago; "
                      f"{note}")
    walk.findings.append(finding)
    if age > PARTIAL_MAX_AGE and not busy and not remote:
        walk.partial.append((finding, entry.mtime))


def _unfinished_upload(walk: _Walk, location: _Location, entry: Entry, age: timedelta,
                       busy: bool) -> None:
    """A multipart upload neither completed nor aborted: parts the store keeps (and bills)
    that no object shows. An old one, with nothing in progress there, is aborted by repair."""
    abandoned = age > PARTIAL_MAX_AGE and not busy
    note = ("abandoned: aborted with repair" if abandoned
            else "an operation is in progress at this location: left alone" if busy
            else "recent: probably an upload in flight")
    walk.findings.append(Finding(
        PARTIAL, location.label, os.path.join(location.root_path, entry.relative_path), None,
        f"unfinished multipart upload {entry.target}, begun "
        f"{age.total_seconds() / 3600:.1f} h ago; {note}"))
    if abandoned:
        walk.uploads.append(entry)


def _repair(opsdb: OpsDB, location: _Location, ssh: SshSettings, walk: _Walk,
            repaired: list[str], changed_packages: set[int]) -> list[Finding]:
    """Mark what is still broken CORRUPT, and what is intact again PRESENT; returns findings
    about what could not be repaired."""
    candidates = [b for b in walk.broken if b.record.status == CopyStatus.PRESENT]
    # (staged copies come back from the archives; freezing purges gains nothing)
    if candidates:
        try:  # re-checked just before recording, in one look: a file back is not condemned
            now_seen = location.stores.look(location.root, location.host, ssh,
                            [Wanted(b.relative_path, rehash=False) for b in candidates])
        except StorageUnavailable as exc:
            return [Finding(SKIPPED, location.label, location.root, None,
                            f"not repaired: {exc}")]
    else:
        now_seen = []
    for broken, seen in zip(candidates, now_seen, strict=True):
        finding, record = broken.finding, broken.record
        if not _still_broken(seen, record, broken.why, broken.seen):
            continue
        with opsdb.session() as session:
            if broken.why == LOST and _taken_away(session, {record.copy_id}):
                continue  # a purge records its deletion (see _taken_away)
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
            changed_packages.add(record.package_id)
        repaired.append(f"copy {record.copy_id} at {location.label} marked corrupt "
                        f"({finding.kind}: {finding.path})")
    _restore(opsdb, location, ssh, walk.intact_again, repaired, changed_packages)
    for upload in walk.uploads:
        try:
            if location.stores.at(location.root).abort_uploads(upload.relative_path,
                                                               upload_id=upload.target):
                repaired.append(f"aborted abandoned multipart upload of {upload.relative_path} "
                                f"at {location.label}")
        except StorageUnavailable:
            continue
    for finding, mtime in walk.partial:  # local only (see audit)
        path = Path(finding.path)
        try:
            if path.lstat().st_mtime != mtime:
                continue  # written to since the walk: in flight after all
            path.unlink()
        except OSError:
            continue
        if staged_final(os.path.relpath(path, location.root_path)) is not None:
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # a batch's staging directory, once empty
        repaired.append(f"removed abandoned temporary file {finding.path}")
    return []


def _restore(opsdb: OpsDB, location: _Location, ssh: SshSettings, intact: list[_Broken],
             repaired: list[str], changed_packages: set[int]) -> None:
    """CORRUPT copies the audit re-read to their checksum: PRESENT, verified now, if the file
    is still the one hashed (looked at again just now: same size, same file) and the copy is
    still its package's tar (a file taken out of the package meanwhile, or a rebuild, leaves
    it quarantined)."""
    if not intact:
        return
    try:
        now_seen = location.stores.look(location.root, location.host, ssh,
                                        [Wanted(b.relative_path, rehash=False) for b in intact])
    except StorageUnavailable:
        return  # reported as intact again; restored by an audit that can look
    with opsdb.session() as session:
        names: dict[int, str] = {id_: name for id_, name in session.execute(
            select(RawDataPackage.id, RawDataPackage.name).where(RawDataPackage.id.in_(
                {b.record.package_id for b in intact if b.record.package_id is not None})))}
    for item, seen in zip(intact, now_seen, strict=True):
        record, now = item.record, utcnow()
        if not _unchanged(item.seen, seen):
            continue  # replaced, removed or written to since it was hashed: not judged
        with opsdb.session() as session:
            if record.package_id in names:  # its first write: serialised with `exclude`
                lock_package(session, names[record.package_id])
            if _superseded(session, record.copy_id) is not None:
                continue
            # Compare-and-set: a repair that superseded the copy meanwhile wins.
            result = session.execute(update(PhysicalCopy).where(
                PhysicalCopy.id == record.copy_id, PhysicalCopy.status == CopyStatus.CORRUPT)
                .values(status=CopyStatus.PRESENT, verified_at=now))
            if not isinstance(result, CursorResult) or result.rowcount != 1:
                continue
            session.add(Operation(
                operation_type=OperationType.VERIFICATION, status=OperationStatus.COMPLETED,
                package_id=record.package_id, copy_id=record.copy_id,
                destination_location_id=location.id, bytes=record.size,
                reason="audit: a corrupt copy's bytes match its checksum again",
                started_at=now, finished_at=now))
        if record.package_id is not None:
            changed_packages.add(record.package_id)
        repaired.append(f"copy {record.copy_id} at {location.label} intact again, marked "
                        f"present ({item.finding.path})")


def _unchanged(hashed: Seen | None, seen: Seen) -> bool:
    """Is the file looked at just now the one that was hashed (same size and identity)?"""
    return hashed is not None and seen.problem is None and hashed.problem is None and (
        (seen.size, seen.inode, seen.device, seen.mtime_ns)
        == (hashed.size, hashed.inode, hashed.device, hashed.mtime_ns))


def _still_broken(seen: Seen, record: _Recorded, why: str, hashed: Seen | None = None) -> bool:
    """Does the storage, looked at again just now, still show what the audit found?

    A checksum mismatch is not re-read (too slow); it stands while the file is the one hashed
    (`hashed`: same size, inode, device and mtime; one put back from a backup since is not)."""
    if why == LOST:
        return seen.missing
    if why == "symlink":
        return seen.problem is not None and "symlink" in seen.problem
    if why == "unreadable" or seen.problem is not None:
        return False  # an I/O error may be passing, or it changed again: only reported
    if why == "checksum" and hashed is not None:
        return _unchanged(hashed, seen)
    return seen.size != record.size if why == "size" else seen.size == record.size

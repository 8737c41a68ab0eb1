"""Re-verification of a package's LTA copies at deletion time.

A deletion certificate used to quote OpsDB's last verification, possibly days old; an LTA copy
removed or rotted since then still counted. Before a purge deletes anything it now looks at
every LTA copy it may rely on, on its storage: the copy exists, is a regular file reached
without symlinks under a marked location root, has the recorded size and identity (inode,
mtime), and its content was hashed within `policies.deletion_recheck_hours` (older, or with a
changed identity: hashed now, batched per location). Two copies that are one file (the same
host, device and inode: a location root swapped for a symlink or mount of another) are not
relied on at all. A copy that fails is marked CORRUPT with
a failed verification operation (the purge freezes; the repair sensor restores it); a location
that cannot be looked at, or a copy its disk fails to read (EIO), is only reported (nothing is
known, so nothing is relied on; the location is marked failing); a copy refused to ccat-dt's
user (a file or directory mode, an ACL) likewise, but its location is not marked: the purge fails
naming the file and whom to make it readable by, and a person is told to grant it.
An LTA copy on S3 is looked at with a HEAD (its size, its ETag standing for the identity, and
the checksum stored with it as metadata) and re-read, streamed, when the window requires it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dt.config import Config
from ccat_dt.health import mark_failed, mark_readable
from ccat_dt.loss import Assessment, Health, assess
from ccat_dt.marker import marked_for_another
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
    RawDataPackage,
    _aware,
    utcnow,
)
from ccat_dt.replicas import refresh_state
from ccat_dt.routing import unreadable_copies
from ccat_dt.storage import Seen, StorageUnavailable, Wanted
from ccat_dt.transports.base import UNREADABLE
from ccat_dt.transports.factory import ssh_settings


@dataclass(frozen=True)
class Rechecked:
    """One LTA copy as found on its storage just before a deletion relies on it."""

    copy_id: int
    checked_at: datetime
    size: int
    hashed_at: datetime  # when its bytes last hashed to the checksum (checked_at if now)
    rehashed: bool
    # Where it was looked at: its location's root and host then. A deletion relies on it
    # only while OpsDB still records its location there (reaper: `ccat-dt migrate` may
    # record a disk move meanwhile).
    root: str
    host: str | None

    def evidence(self) -> dict[str, Any]:
        return {"checked_at": self.checked_at.isoformat(), "size": self.size,
                "regular_file": True, "root_marked": True,
                "hashed_at": self.hashed_at.isoformat(), "rehashed_now": self.rehashed}


@dataclass(frozen=True)
class RecheckReport:
    passed: dict[int, Rechecked]
    problems: list[str]  # one line per copy that failed or could not be looked at
    unavailable: dict[int, str] = field(default_factory=dict)  # copy id -> why its storage
    # could not be looked at now (the link, the host, an unmounted disk)


@dataclass(frozen=True)
class _Copy:
    id: int
    location_id: int
    label: str
    root: str
    host: str | None
    relative_path: str
    size: int
    checksum: str
    verified_at: datetime
    inode: int | None
    mtime_ns: int | None


def _lta_copies(session: Session, package: RawDataPackage) -> list[_Copy]:
    rows = session.scalars(
        select(PackageCopy).join(DataLocation, PackageCopy.location_id == DataLocation.id)
        .where(PackageCopy.package_id == package.id,
               DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE,
               PackageCopy.status == CopyStatus.PRESENT)
        .order_by(PackageCopy.id).execution_options(populate_existing=True)).all()
    return [_Copy(c.id, c.location_id, c.location.label, c.location.root, c.location.host,
                  c.relative_path, c.size, c.checksum, _aware(c.verified_at), c.inode,
                  c.mtime_ns)
            for c in rows if c.is_verified and c.verified_at is not None
            and (package.checksum is None or c.checksum == package.checksum)]


def _judge(copy: _Copy, seen: Seen) -> str | None:
    """Why the copy found on the storage is not the verified copy, or None."""
    if seen.problem is not None:
        return seen.problem
    if seen.size != copy.size:
        return f"size {seen.size} on the storage, {copy.size} recorded"
    if seen.checksum is not None and seen.checksum != copy.checksum:
        return f"checksum mismatch: expected {copy.checksum}, read {seen.checksum}"
    if seen.stored_checksum is not None and seen.stored_checksum != copy.checksum:
        return (f"the object store holds it with checksum {seen.stored_checksum}, "
                f"{copy.checksum} recorded: it was rewritten")
    return None


def _changed_identity(copy: _Copy, seen: Seen) -> bool:
    return (copy.inode is None or copy.mtime_ns is None
            or (seen.inode, seen.mtime_ns) != (copy.inode, copy.mtime_ns))


def recheck_lta_copies(opsdb: OpsDB, config: Config, package_name: str, *,
                       now: datetime | None = None, dry_run: bool = False,
                       reason: str = "re-check before a deletion") -> RecheckReport:
    """Look at every verified LTA copy of the package on its storage (see module docstring).

    `dry_run` (`purge --plan`): existence, type and size only, nothing hashed or recorded.
    `reason`: what a copy that fails is marked CORRUPT for (its verification operation)."""
    now = _aware(now or utcnow())
    window = timedelta(hours=config.settings.policies.deletion_recheck_hours)
    with opsdb.session() as session:
        package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == package_name))
        if package is None:
            raise LookupError(f"unknown package '{package_name}'")
        copies = _lta_copies(session, package)
        # A copy whose disk failed its read as a source, or a re-read of it (its check, the
        # scrub), since it was last verified is not relied on unread: hashed now, whenever it
        # was last verified.
        suspect = unreadable_copies(session, package) | _reread_failed(session, package)
    by_location: dict[tuple[str, str | None], list[_Copy]] = defaultdict(list)
    for copy in copies:
        by_location[(copy.root, copy.host)].append(copy)
    ssh = ssh_settings(config)
    look = Stores.of(config).look  # disk, local or over ssh; or an object store
    passed: dict[int, Rechecked] = {}
    failed: dict[int, str] = {}
    problems: list[str] = []
    unavailable: dict[int, str] = {}
    identities: dict[int, tuple[str, int, int]] = {}  # copy id -> (host, device, inode)
    for (root, host), group in by_location.items():
        try:
            # A local root whose marker names another location is another location's disk
            # (disks swapped): nothing there is this location's copy.
            if host is None and not is_object_root(root) and (
                    wrong := marked_for_another(Path(root), group[0].label)):
                raise StorageUnavailable(wrong)
            # First look: hash what is stale (or never had its identity recorded). A
            # verified_at after `now` was written by a clock ahead of ours (another host's, or
            # ours before NTP stepped it back): when it was hashed is unknown, so hash it.
            stale = [not dry_run and (c.verified_at < now - window or c.verified_at > now
                                      or c.inode is None or c.id in suspect)
                     for c in group]
            seen = look(root, host, ssh, [Wanted(c.relative_path, s)
                                          for c, s in zip(group, stale, strict=True)])
            # A file whose inode or mtime changed since it was recorded is hashed now too.
            again = [i for i, (c, s) in enumerate(zip(group, seen, strict=True))
                     if not dry_run and s.problem is None and s.checksum is None
                     and _changed_identity(c, s)]
            if again:
                for i, second in zip(again, look(root, host, ssh, [
                        Wanted(group[i].relative_path, True) for i in again]), strict=True):
                    seen[i] = second
        except StorageUnavailable as exc:
            for c in group:
                unavailable[c.id] = f"{c.label} copy {c.id}: cannot be re-checked: {exc}"
                problems.append(unavailable[c.id])
            continue
        checked_at = now  # the purge's notion of now (the same clock its decisions use)
        for copy, found in zip(group, seen, strict=True):
            if found.unreadable:  # its disk failed the read: not relied on, not proved bad
                unavailable[copy.id] = f"{copy.label} copy {copy.id}: {found.problem}"
                problems.append(unavailable[copy.id])
                # Refused to ccat-dt's user (a mode, an owner, an ACL): not the disk's fault;
                # the purge fails naming it, and a person is told to grant it (notify.py).
                if not dry_run and not found.refused:
                    mark_failed(opsdb, config, copy.location_id, f"copy {copy.id} at "
                                f"{copy.root}/{copy.relative_path}: {found.problem}")
                continue
            problem = _judge(copy, found)
            if problem is not None:
                failed[copy.id] = problem
                problems.append(f"{copy.label} copy {copy.id}: {problem}")
                continue
            rehashed = found.checksum is not None
            if found.device is not None and found.inode is not None:
                identities[copy.id] = (copy.host or "", found.device, found.inode)
            passed[copy.id] = Rechecked(copy.id, checked_at, found.size or 0,
                                        checked_at if rehashed else copy.verified_at, rehashed,
                                        copy.root, copy.host)
            if rehashed:
                _record_rehash(opsdb, copy, found, checked_at)
    for copy, other in _one_file_twice(copies, identities):
        del passed[copy.id]  # neither is known to be at its own location: none is relied on
        unavailable[copy.id] = (
            f"{copy.label} copy {copy.id}: the same file on the storage as {other.label} copy "
            f"{other.id} (device and inode {identities[copy.id][1:]}): two archive locations on "
            "one directory (a mount or symlink changed?) are not two copies; fix the mount, "
            "then audit")
        problems.append(unavailable[copy.id])
    if failed and not dry_run:
        _mark_corrupt(opsdb, config, package_name, failed, reason)
    return RecheckReport(passed, problems, unavailable)


def assess_on_storage(opsdb: OpsDB, config: Config, package_name: str) -> Assessment:
    """Whether every filed byte of the package is in a good copy, with the LTA copies that
    verdict rests on looked at on their storage first, as a purge looks before it deletes
    (a copy found gone or changed is marked CORRUPT, and the repair sensor restores it): what
    `filed_bytes_safe` says when run, also alone from the UI. OpsDB's last verification
    alone said "verified LTA copies at cologne, us" of a package whose archive copies were
    deleted or rotted since. A copy whose storage cannot be looked at now is not counted."""
    with opsdb.session() as session:
        package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == package_name))
        if package is None:
            raise LookupError(f"unknown package '{package_name}'")
        first = assess(session, config, package)
    if first.at_source:
        return first  # no copy relied on (the sources: raw_files_present looks at them)
    report = recheck_lta_copies(opsdb, config, package_name,
                                reason="re-check for filed_bytes_safe")
    with opsdb.session() as session:
        package = session.scalars(select(RawDataPackage).where(
            RawDataPackage.name == package_name)).one()
        found = assess(session, config, package)
        looked = {c.location.site.short_name for c in _lta_rows(session, package)
                  if c.id in report.passed}
    required = config.settings.required_lta_copies
    if found.health != Health.SAFE or not report.unavailable or len(looked) >= required:
        return found if not report.problems else Assessment(
            found.health, f"{found.reason} (looked at now: {'; '.join(report.problems)})")
    return Assessment(Health.AT_RISK, (
        f"NOT CONFIRMED: sources purged and only {len(looked)} of {required} required LTA "
        f"copies could be looked at now ({', '.join(sorted(looked)) or 'none'}): "
        f"{'; '.join(report.problems)}"))


def _lta_rows(session: Session, package: RawDataPackage) -> list[PackageCopy]:
    return list(session.scalars(
        select(PackageCopy).join(DataLocation, PackageCopy.location_id == DataLocation.id)
        .where(PackageCopy.package_id == package.id,
               DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE)))


def _reread_failed(session: Session, package: RawDataPackage) -> set[int]:
    """The package's copies a re-read could not read (replicas.reread: "not re-read: cannot
    read ...", an I/O error or a refusal) after they were last verified."""
    rows = session.execute(
        select(PackageCopy.id, PackageCopy.verified_at, Operation.finished_at)
        .join(Operation, Operation.copy_id == PackageCopy.id)
        .where(Operation.package_id == package.id,
               Operation.operation_type == OperationType.VERIFICATION,
               Operation.status == OperationStatus.FAILED,
               Operation.error.contains(f"not re-read: {UNREADABLE}"))).tuples()
    return {copy_id for copy_id, verified_at, failed_at in rows if failed_at is not None
            and (verified_at is None or _aware(verified_at) <= _aware(failed_at))}


def _one_file_twice(copies: list[_Copy], identities: dict[int, tuple[str, int, int]]
                    ) -> list[tuple[_Copy, _Copy]]:
    """Copies that passed but are one file on the storage (the same host, device and inode)
    as another: (each such copy, another it is)."""
    by_file: dict[tuple[str, int, int], list[_Copy]] = defaultdict(list)
    for copy in copies:
        if copy.id in identities:
            by_file[identities[copy.id]].append(copy)
    return [(copy, group[1] if copy is group[0] else group[0])
            for group in by_file.values() if len(group) > 1 for copy in group]


def _record_rehash(opsdb: OpsDB, copy: _Copy, seen: Seen, at: datetime) -> None:
    with opsdb.session() as session:
        stored = session.get_one(PackageCopy, copy.id)
        if stored.status == CopyStatus.PRESENT:
            stored.verified_at, stored.inode, stored.mtime_ns = at, seen.inode, seen.mtime_ns
            mark_readable(session, stored.location_id)  # a mark for its read is over


def _mark_corrupt(opsdb: OpsDB, config: Config, package_name: str,
                  failed: dict[int, str], reason: str) -> None:
    with opsdb.session() as session:
        package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == package_name))
        assert package is not None
        now = utcnow()
        for copy_id, problem in failed.items():
            stored = session.get_one(PackageCopy, copy_id)
            if stored.status == CopyStatus.PRESENT:
                stored.status = CopyStatus.CORRUPT
            session.add(Operation(
                operation_type=OperationType.VERIFICATION, status=OperationStatus.FAILED,
                package_id=package.id, copy_id=copy_id,
                destination_location_id=stored.location_id,
                reason=reason, error=problem, started_at=now,
                finished_at=now))
        session.flush()
        refresh_state(session, config, package)  # LOST when no good copy is left

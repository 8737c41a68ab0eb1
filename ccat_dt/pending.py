"""What the sensors ask OpsDB: which work became possible since the last tick.

Each query pages by monotonic ids (the sensor's cursor), so a tick stays short however large
the archive grows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from ccat_dt.config import Config
from ccat_dt.health import read_failure_reason, refusal_reason
from ccat_dt.marker import root_problem
from ccat_dt.opsdb.models import (
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
    Reattempt,
    Site,
    StagingRequest,
    StagingState,
    _aware,
)
from ccat_dt.routing import copies_at, nearest_lta_copy, replication_source
from ccat_dt.staged_files import look_at_staged
from ccat_dt.stages import Stage

PAGE = 500


@dataclass(frozen=True)
class Due:
    """One piece of work: a package (at a site), and the OpsDB row that made it due."""

    package: str
    site: str = ""  # "" for per-package work
    trigger: int = 0  # id of the copy (or request) whose arrival made this due
    origin: str = ""  # site the bytes come from, for transfers (names the link)

    def run_key(self, stage: str) -> str:
        """Deterministic: a replayed tick asks for the same run; a new trigger (a repaired
        copy, say) asks for a new one."""
        return ":".join([stage, self.package, *([self.site] if self.site else []),
                         *([str(self.trigger)] if self.trigger else [])])


@dataclass(frozen=True)
class Page:
    """Work found after a cursor, and where the next tick should continue."""

    items: list[Due]
    cursor: int


def not_ahead(session: Session, column: InstrumentedAttribute[int], after_id: int) -> int:
    """A sensor's position (`after_id`) with nothing after it; 0 (from the start, as a
    cleared cursor: the run keys and the runs in flight keep that from doing anything twice)
    if it is past every row. A position ahead of OpsDB (set by hand in the UI, OpsDB restored
    from an older backup) passed over every row made until the ids reached it; the newest id
    would pass over those made between the edit and this tick."""
    newest = session.scalar(select(func.max(column))) or 0
    return after_id if after_id <= newest else 0


def new_packages(session: Session, after_id: int, limit: int = PAGE) -> Page:
    rows = session.execute(select(RawDataPackage.id, RawDataPackage.name)
                           .where(RawDataPackage.id > after_id)
                           .order_by(RawDataPackage.id).limit(limit)).all()
    return Page([Due(name) for _, name in rows],
                rows[-1][0] if rows else not_ahead(session, RawDataPackage.id, after_id))


def new_staging_requests(session: Session, after_id: int, limit: int = PAGE) -> Page:
    rows = session.execute(select(StagingRequest.id, StagingRequest.name)
                           .where(StagingRequest.id > after_id)
                           .order_by(StagingRequest.id).limit(limit)).all()
    return Page([Due(name) for _, name in rows],
                rows[-1][0] if rows else not_ahead(session, StagingRequest.id, after_id))


def staged_files_gone(session: Session, now: datetime, after_id: int = 0,
                      limit: int = 10 * PAGE) -> tuple[list[Due], int]:
    """Active requests, staged before, some of whose staged files are gone from their disk now
    (a processing job removed one, say): staged again, with nobody asked. Looks at up to
    `limit` staged files after copy id `after_id` (a large request is looked at over several
    ticks); returns the requests, and where the next look goes on (0: from the start).
    `trigger` names the gone files as recorded, so a replayed tick asks for the same run, and
    a file removed again after its restoration (a new inode) for a new one. A processing disk
    that does not read as mounted here is not looked at (a host without it says nothing of
    its files); changed files are a person's (the staging run names them, `why` too)."""
    copies = list(session.scalars(
        select(RawDataFileCopy).join(StagingRequest,
                                     RawDataFileCopy.staging_request_id == StagingRequest.id)
        .where(RawDataFileCopy.status == CopyStatus.STAGED, RawDataFileCopy.id > after_id,
               StagingRequest.state == StagingState.ACTIVE,
               StagingRequest.staged_at.is_not(None), StagingRequest.expires_at > now)
        .order_by(RawDataFileCopy.id).limit(limit)))
    unmounted = {root for root in {c.location.root for c in copies} if root_problem(Path(root))}
    gone: dict[int, list[RawDataFileCopy]] = {}
    for copy in look_at_staged([c for c in copies if c.location.root not in unmounted],
                               rehash=False).missing:
        gone.setdefault(copy.staging_request_id or 0, []).append(copy)
    out = []
    for request_id, missing in sorted(gone.items()):
        named = ",".join(f"{c.id}/{c.inode}/{c.mtime_ns}" for c in missing)
        out.append(Due(session.get_one(StagingRequest, request_id).name, trigger=int(
            hashlib.sha1(named.encode()).hexdigest()[:12], 16)))
    return out, (copies[-1].id if len(copies) == limit else 0)


def unfinished(session: Session, created_before: datetime, after: str = "",
               limit: int = PAGE) -> dict[str, datetime]:
    """Up to `limit` packages not archived yet (nor quarantined or lost) and active staging
    requests, created before `created_before`, with no work failing (a re-attempt row: that
    is the re-attempts' business), by name after `after`, with when each was created: the
    page a sweep for unattended work looks at."""
    failing = select(Reattempt.package)
    packages = session.execute(select(RawDataPackage.name, RawDataPackage.created_at).where(
        RawDataPackage.state.not_in([PackageState.ARCHIVED, PackageState.FAILED,
                                     PackageState.LOST]),
        RawDataPackage.name.not_in(failing), RawDataPackage.created_at <= created_before,
        RawDataPackage.name > after).order_by(RawDataPackage.name).limit(limit)).all()
    requests = session.execute(select(StagingRequest.name, StagingRequest.created_at).where(
        StagingRequest.state == StagingState.ACTIVE, StagingRequest.name.not_in(failing),
        StagingRequest.created_at <= created_before, StagingRequest.name > after)
        .order_by(StagingRequest.name).limit(limit)).all()
    return {name: _aware(created) for name, created in sorted([*packages, *requests])[:limit]}


def _new_copies(session: Session, after_id: int, kind: LocationType,
                limit: int) -> list[PackageCopy]:
    return list(session.scalars(
        select(PackageCopy).join(DataLocation)
        .where(PackageCopy.id > after_id, DataLocation.location_type == kind)
        .order_by(PackageCopy.id).limit(limit)))


def site_copies_due(session: Session, config: Config, after_id: int, limit: int = PAGE) -> Page:
    """A verified copy at the observatory buffer sends the package to its primary archive
    site; a verified LTA copy at one archive seeds every archive that lacks the package."""
    copies = _new_copies(session, after_id, LocationType.BUFFER, limit)
    copies += _new_copies(session, after_id, LocationType.LONG_TERM_ARCHIVE, limit)
    copies.sort(key=lambda c: c.id)
    copies = copies[:limit]
    due: list[Due] = []
    for copy in copies:
        if not copy.is_verified:
            continue
        package, site = copy.package, copy.location.site.short_name
        if site == config.settings.observatory:
            targets = [package.primary_site.short_name]
        elif copy.location.location_type == LocationType.LONG_TERM_ARCHIVE:
            targets = [s.short_name for s in config.settings.archive_sites if s.short_name != site]
        else:
            continue
        due += [Due(package.name, t, copy.id, site) for t in targets
                if not _held_at(session, package, t)]
    return Page(due, copies[-1].id if copies else not_ahead(session, PhysicalCopy.id, after_id))


def newest_package_id(session: Session) -> int:
    return session.scalar(select(func.max(RawDataPackage.id))) or 0


def seeds_due(session: Session, config: Config, site: str, after_id: int, until_id: int,
              limit: int = PAGE) -> Page:
    """Packages (by id, after the cursor, up to `until_id`: the newest when the site was
    added) that the archive site holds no copy of and a verified LTA copy at another archive
    can give it, from the nearest such copy. A new LTA copy seeds every archive as it comes
    (site_copies_due); this sweep reaches what came before: an archive site added to a
    running deployment receives every package archived before it was there. A package not
    yet in any archive is passed over: its first LTA copy seeds the site."""
    ids = session.scalars(select(RawDataPackage.id)
                          .where(RawDataPackage.id > after_id, RawDataPackage.id <= until_id)
                          .order_by(RawDataPackage.id).limit(limit)).all()
    held = (select(PhysicalCopy.id).join(DataLocation).join(Site)
            .where(PhysicalCopy.package_id == RawDataPackage.id, Site.short_name == site,
                   PhysicalCopy.status != CopyStatus.DELETED,
                   DataLocation.location_type.in_([LocationType.BUFFER,
                                                   LocationType.LONG_TERM_ARCHIVE])))
    due: list[Due] = []
    for package in session.scalars(select(RawDataPackage)
                                   .where(RawDataPackage.id.in_(ids), ~held.exists())
                                   .order_by(RawDataPackage.id)):
        source = nearest_lta_copy(session, config, package, site)
        if source is not None:
            due.append(Due(package.name, site, source.id, source.location.site.short_name))
    return Page(due, ids[-1] if ids else after_id)


def lta_copies_due(session: Session, config: Config, after_id: int, limit: int = PAGE) -> Page:
    """A verified copy in an archive site's buffer is archived into that site's LTA, unless
    that holds a verified copy already (the copy's own run archived it, in the embedded
    default) or an attempt to archive it since the copy was made failed or is still open: a
    failed or dead attempt is the re-attempt sensor's, after its back-off (an immediate second
    run would skip the back-off, and retry what no retry fixes)."""
    copies = _new_copies(session, after_id, LocationType.BUFFER, limit)
    due = [Due(c.package.name, c.location.site.short_name, c.id, c.location.site.short_name)
           for c in copies
           if c.is_verified and c.location.site.short_name != config.settings.observatory
           and not any(a.is_verified for a in copies_at(
               session, c.package, LocationType.LONG_TERM_ARCHIVE, c.location.site.short_name))
           and not _archive_failed_or_running(session, c)]
    return Page(due, copies[-1].id if copies else not_ahead(session, PhysicalCopy.id, after_id))


def _archive_failed_or_running(session: Session, buffer_copy: PackageCopy) -> bool:
    return session.scalar(select(Operation.id).where(
        Operation.package_id == buffer_copy.package_id,
        Operation.operation_type == OperationType.ARCHIVE,
        Operation.status.in_([OperationStatus.FAILED, OperationStatus.IN_PROGRESS]),
        Operation.source_location_id == buffer_copy.location_id,
        Operation.started_at >= buffer_copy.created_at).limit(1)) is not None


def _held_at(session: Session, package: RawDataPackage, site: str) -> bool:
    return any(c.status != CopyStatus.DELETED
               for kind in (LocationType.BUFFER, LocationType.LONG_TERM_ARCHIVE)
               for c in copies_at(session, package, kind, site))


def repairs_due(session: Session, config: Config,
                limit: int = PAGE) -> list[tuple[Stage, Due]]:
    """Archive copies found CORRUPT with no good copy of that kind at their site, where a
    verified copy can restore them: (stage, work). An LTA copy is re-archived from the site's
    buffer when that is still verified, else the buffer is refilled first, as the routing
    says (from a good LTA copy elsewhere, or, while no archive holds the package yet, the
    observatory's buffer; never from the bad one)."""
    corrupt = session.scalars(
        select(PackageCopy).join(DataLocation)
        .where(PackageCopy.status == CopyStatus.CORRUPT,
               DataLocation.location_type.in_([LocationType.BUFFER,
                                               LocationType.LONG_TERM_ARCHIVE]))
        .order_by(PackageCopy.id).limit(limit)).all()
    due: list[tuple[Stage, Due]] = []
    for copy in corrupt:
        package, site = copy.package, copy.location.site.short_name
        kind = copy.location.location_type
        if site == config.settings.observatory or any(
                c.status == CopyStatus.PRESENT for c in copies_at(session, package, kind, site)):
            continue
        buffered = [c for c in copies_at(session, package, LocationType.BUFFER, site)
                    if c.is_verified]
        if kind == LocationType.LONG_TERM_ARCHIVE and buffered:
            if not any(_archive_failed_or_running(session, c) for c in buffered):
                # a failed or open archiving of it is the re-attempt sensor's, after its
                # back-off, as in lta_copies_due
                due.append((Stage.LTA_COPY, Due(package.name, site, copy.id)))
        elif replication_source(session, config, package, site) is not None:
            due.append((Stage.SITE_COPY, Due(package.name, site, copy.id)))
        # else nothing good to restore from (yet)
    return due


def scrub_due(session: Session, budget_bytes: int, now: datetime,
              limit: int = PAGE) -> list[Due]:
    """LTA copies to re-read now: the longest unverified first, within the byte budget (at
    least one, so that a copy larger than the budget is still scrubbed eventually). A location
    passed over as unhealthy (one the scrub found unmounted, say) waits out its hold, so that
    it does not take every hour's budget from the others; a full or read-only one is
    read as ever, and so is one marked for a file its disk failed to read (one bad sector
    says nothing of the other copies there: re-reading them is how more would be found)."""
    copies = session.scalars(
        select(PackageCopy).join(DataLocation)
        .where(PackageCopy.status == CopyStatus.PRESENT,
               DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE,
               or_(DataLocation.unhealthy_until.is_(None), DataLocation.unhealthy_until <= now,
                   refusal_reason(), read_failure_reason()))
        .order_by(PackageCopy.verified_at, PackageCopy.id).limit(limit)).all()
    due: list[Due] = []
    spent = 0
    for copy in copies:
        if due and spent + copy.size > budget_bytes:
            break
        spent += copy.size
        due.append(Due(copy.package.name, copy.location.site.short_name, copy.id))
    return due


def finished_packages(session: Session, archived_before: datetime, among: Collection[str],
                      archive_sites: Collection[str]) -> list[str]:
    """Those of `among` (live Dagster partitions) archived before the given time with nothing
    left outside the LTA and a present copy in every archive site's LTA (one found corrupt, or
    a site added since, still needs a run of the package): their partitions can be retired
    (their history stays in OpsDB).

    Asked per candidate, so the cost follows the live partitions, not the archive's history."""
    package = RawDataPackage
    outside_lta = (select(PhysicalCopy.id)
                   .join(DataLocation, PhysicalCopy.location_id == DataLocation.id)
                   .where(PhysicalCopy.package_id == package.id,
                          PhysicalCopy.status != CopyStatus.DELETED,
                          DataLocation.location_type != LocationType.LONG_TERM_ARCHIVE))
    raw_left = (select(PhysicalCopy.id)
                .join(RawDataFile, PhysicalCopy.raw_data_file_id == RawDataFile.id)
                .where(RawDataFile.package_id == package.id,
                       PhysicalCopy.status != CopyStatus.DELETED))
    archived_at = [select(PhysicalCopy.id).join(DataLocation).join(Site)
                   .where(PhysicalCopy.package_id == package.id, Site.short_name == site,
                          PhysicalCopy.status == CopyStatus.PRESENT,
                          DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE).exists()
                   for site in sorted(set(archive_sites))]
    names = sorted(set(among))
    finished: list[str] = []
    for start in range(0, len(names), PAGE):
        finished += session.scalars(
            select(package.name)
            .where(package.name.in_(names[start:start + PAGE]),
                   package.state == PackageState.ARCHIVED,
                   package.archived_at < archived_before,
                   ~outside_lta.exists(), ~raw_left.exists(), *archived_at)
            .order_by(package.name))
    return finished


def unknown_names(session: Session, among: Collection[str],
                  kind: type[RawDataPackage] | type[StagingRequest] = RawDataPackage) -> list[str]:
    """Those of `among` (live Dagster partitions) naming no package (or staging request) in
    OpsDB: added by hand in the UI, or left over by an OpsDB restored from an older backup.
    A partition never precedes its row: the sensors add it after OpsDB committed the row."""
    names = sorted(set(among))
    known: set[str] = set()
    for start in range(0, len(names), PAGE):
        known.update(session.scalars(select(kind.name).where(
            kind.name.in_(names[start:start + PAGE]))))
    return [name for name in names if name not in known]


@dataclass(frozen=True)
class Quarantine:
    """A copy found bad (by a check, the scrub, the audit or a deletion-time re-check) that is
    still bad: what the integrity report of its stage must say until it is repaired."""

    package: str
    site: str
    kind: LocationType
    observatory: bool  # the package's tar at the observatory buffer (the packages stage)
    description: str
    operation_id: int


def quarantines_found(session: Session, config: Config, after_id: int,
                      limit: int = PAGE) -> tuple[list[Quarantine], int]:
    """Failed verifications recorded after `after_id` whose copy is still CORRUPT with no
    verified copy of that kind at its site (a repair since makes them moot), and the cursor."""
    from ccat_dt.opsdb.models import Operation, OperationStatus, OperationType

    if after_id == 0:  # a first tick (or cursor lost): what is quarantined now, then onwards
        return _quarantined_now(session, config, limit)
    rows = session.execute(
        select(Operation.id, Operation.status, Operation.operation_type, Operation.copy_id,
               Operation.error)
        .where(Operation.id > after_id).order_by(Operation.id).limit(limit)).all()
    if not rows and not_ahead(session, Operation.id, after_id) < after_id:
        return _quarantined_now(session, config, limit)  # ahead of OpsDB: as a lost cursor
    found: list[Quarantine] = []
    for op_id, status, kind_of_op, copy_id, error in rows:
        if (kind_of_op != OperationType.VERIFICATION or status != OperationStatus.FAILED
                or copy_id is None):
            continue
        copy = session.get(PackageCopy, copy_id)
        if copy is None or copy.status != CopyStatus.CORRUPT:
            continue  # a raw file's copy, or already replaced
        kind, site = copy.location.location_type, copy.location.site.short_name
        if kind not in (LocationType.BUFFER, LocationType.LONG_TERM_ARCHIVE) or any(
                c.is_verified for c in copies_at(session, copy.package, kind, site)):
            continue
        found.append(Quarantine(copy.package.name, site, kind,
                                site == config.settings.observatory,
                                f"{copy.location.label}: copy {copy.id} quarantined: "
                                f"{error or 'failed its verification'}", op_id))
    return found, rows[-1][0] if rows else after_id


def _quarantined_now(session: Session, config: Config,
                     limit: int) -> tuple[list[Quarantine], int]:
    """Every copy CORRUPT now with no verified copy of its kind at its site (the newest
    failed verification of each says why), and the newest operation id as the cursor."""
    from sqlalchemy import func

    from ccat_dt.opsdb.models import Operation, OperationStatus, OperationType

    newest = session.scalar(select(func.max(Operation.id))) or 0
    found: list[Quarantine] = []
    for copy in session.scalars(select(PackageCopy).where(
            PackageCopy.status == CopyStatus.CORRUPT).order_by(PackageCopy.id).limit(limit)):
        kind, site = copy.location.location_type, copy.location.site.short_name
        if kind not in (LocationType.BUFFER, LocationType.LONG_TERM_ARCHIVE) or any(
                c.is_verified for c in copies_at(session, copy.package, kind, site)):
            continue
        why = session.execute(select(Operation.id, Operation.error).where(
            Operation.copy_id == copy.id, Operation.operation_type == OperationType.VERIFICATION,
            Operation.status == OperationStatus.FAILED)
            .order_by(Operation.id.desc()).limit(1)).first()
        found.append(Quarantine(copy.package.name, site, kind,
                                site == config.settings.observatory,
                                f"{copy.location.label}: copy {copy.id} quarantined: "
                                f"{(why[1] if why else None) or 'failed its verification'}",
                                why[0] if why else 0))
    return found, newest

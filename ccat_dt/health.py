"""Location health: a location that fails as a whole (host unreachable, root unmarked or
missing, disk full, permission denied) is passed over for the next location of its kind by
priority for `policies.location_unhealthy_minutes`; a success there clears it. A per-file
fault (a checksum mismatch, a missing source file) says nothing about the location.

Copies already verified at an unhealthy location are not touched: only where new work goes
changes. `failing_since` (the first location failure since the last success) is what the site
failover (ccat_dt/failover.py) measures against its horizon."""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session

from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    PhysicalCopy,
    Site,
    _aware,
    utcnow,
)
from ccat_dt.transports.base import (
    DISK_READ_FAILED,
    FOREIGN_FILE,
    IN_THE_WAY,
    PEER_FAILED,
    SOURCE_MISSING,
    SOURCE_UNREADABLE,
    TOO_LARGE,
    UNREADABLE,
    disk_failed_read,
)

# A transfer refused because its final name holds a file OpsDB does not know (replicas.py):
# that file's, not the location's, and a person's to look at (notify.py).
# A file larger than the destination takes (EFBIG): that file's too; smaller ones still go there.
# A file where the package's (its observation's) directory should be: that package's; the
# others still go there.
# Compared with the failure's text lower-cased, so lower-cased too (FOREIGN_FILE says "OpsDB").
_PER_FILE = tuple(marker.lower() for marker in (
    "checksum mismatch", SOURCE_MISSING, SOURCE_UNREADABLE, "no longer verified", FOREIGN_FILE,
    PEER_FAILED, TOO_LARGE, IN_THE_WAY))
_LOCATION_ERRNO = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                   errno.EIO, errno.ENOTCONN, errno.EHOSTUNREACH, errno.ENETUNREACH,
                   errno.ECONNREFUSED, errno.ETIMEDOUT}


def location_failure(exc: BaseException) -> bool:
    """Whether a failed write to a location is the location's own fault (not one file's)."""
    text = str(exc).lower()
    if any(marker in text for marker in _PER_FILE):
        return False
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _LOCATION_ERRNO
    return True  # a root problem, an unreachable host, a transport refusing the destination


# What a location's failure says when its disk refuses writes yet can still be read: full (or
# its quota), or read-only (the kernel remounted it so after errors, a person mounted it so).
_FULL = ("no space left", "disk quota exceeded", "disk full")
_READ_ONLY = ("read-only file system",)


def refusal_reason() -> ColumnElement[bool]:
    """SQL: the location's recorded failure says its disk refuses writes (`refuses_writes`)."""
    return or_(*(DataLocation.unhealthy_reason.ilike(f"%{text}%")
                 for text in (*_FULL, *_READ_ONLY)))


def write_refused(exc: BaseException | str) -> str | None:
    """"full" or "read-only" when a failure says the disk written to refuses writes so."""
    text = str(exc).lower()
    if any(marker in text for marker in _FULL):
        return "full"
    if any(marker in text for marker in _READ_ONLY):
        return "read-only"
    return None


def refuses_writes(location: DataLocation) -> str | None:
    """"full" or "read-only" while the location fails because its disk refuses writes so
    (since `failing_since`): only a person heals that (or, a full buffer, the purge); its
    copies are read as ever."""
    if location.failing_since is None:
        return None
    return write_refused(location.unhealthy_reason or "")


def refusing_locations(session: Session) -> list[tuple[DataLocation, str]]:
    """The locations whose writes fail because their disk is full or read-only, with which."""
    return [(location, how) for location in session.scalars(select(DataLocation).where(
        DataLocation.failing_since.is_not(None)).order_by(DataLocation.id))
        if (how := refuses_writes(location)) is not None]


# What a location's failure says when its disk failed an operation (EIO: a bad sector, a
# failing controller): its copies are not proved bad by it, and it may pass.
_IO_ERROR = "input/output error"


def disk_errs(location: DataLocation) -> bool:
    """The location's recorded failure says its disk failed an operation (an I/O error) or the
    read of a file there: the disk is mounted and answers, a person checks it (not: mount it)."""
    reason = (location.unhealthy_reason or "").lower()
    return _IO_ERROR in reason or UNREADABLE in reason or DISK_READ_FAILED in reason


# How `mark_unreadable_source` records a copy its disk failed to read as the source of a copy.
_SOURCE_READ = "read as the source of a copy"


def read_failed(location: DataLocation) -> bool:
    """The location's recorded failure is one file its disk failed to read (`read_failure_reason`):
    its other files are read, and it is written to, as ever."""
    reason = location.unhealthy_reason or ""
    return UNREADABLE in reason or _SOURCE_READ in reason


def mark_unreadable_source(opsdb: OpsDB, config: Config, copy_id: int, path: str,
                           failure: BaseException | str) -> None:
    """A transfer, an archiving or a staging from the copy failed because its disk failed the
    read of its file at `path` (`disk_failed_read`, not a refusal for lack of permission): its
    location is marked failing, naming the copy and the file, and its disk told to a person at
    once (notify.py). The work heals by itself from another verified copy
    (routing.unreadable_copies), so nothing would read this one again before a purge relied
    on it or the scrub came by: a disk with a bad sector would go unreported until then."""
    text = str(failure)
    if not disk_failed_read(text) or path not in text:
        return  # another file's (a batch's), or refused: the permission is told as such
    with opsdb.session() as session:
        location_id = session.get_one(PhysicalCopy, copy_id).location_id
    mark_failed(opsdb, config, location_id, f"copy {copy_id} at {path}, {_SOURCE_READ}: "
                f"{text}")


# How `replicas.source_down` records a location that could not be looked at (unreachable,
# unmounted, refused) after a copy read from it failed: passed over as a source (`unreachable`)
# while another verified copy can be read, until its hold ends or a read there succeeds.
SOURCE_DOWN = "could not be reached as the source of a copy"


def unreachable(location: DataLocation, now: datetime) -> bool:
    """Whether the location is passed over as a source now: unhealthy for a failure as a whole
    (unreachable, unmounted, refused), not for a disk that refuses writes (read as ever) nor
    for one file its disk failed to read (its other files are read as ever)."""
    return (not is_healthy(location, now) and refuses_writes(location) is None
            and not read_failed(location))


def source_reads_failing(session: Session) -> list[DataLocation]:
    """The locations marked by `mark_unreadable_source`, with no success there since."""
    return list(session.scalars(select(DataLocation).where(
        DataLocation.failing_since.is_not(None),
        DataLocation.unhealthy_reason.contains(_SOURCE_READ)).order_by(DataLocation.id)))


def failing_disks(session: Session, config: Config) -> list[DataLocation]:
    """The locations whose disk failed with an I/O error again after it first did, with no
    success there between: not a passing error (that one is retried, and heals unseen) but a
    disk a person must look at."""
    hold = timedelta(minutes=config.settings.policies.location_unhealthy_minutes)
    return [location for location in session.scalars(select(DataLocation).where(
        DataLocation.failing_since.is_not(None),
        DataLocation.unhealthy_reason.ilike(f"%{_IO_ERROR}%")).order_by(DataLocation.id))
        if location.unhealthy_until is not None and location.failing_since is not None
        and _aware(location.unhealthy_until) - hold > _aware(location.failing_since)]


def is_healthy(location: DataLocation, now: datetime) -> bool:
    until = location.unhealthy_until
    return until is None or _aware(until) <= _aware(now)


def choose(locations: Sequence[DataLocation], now: datetime) -> DataLocation:
    """The first healthy location in priority order; when none is, the first (its failure
    is reported, and re-attempted, rather than work going nowhere)."""
    return next((loc for loc in locations if is_healthy(loc, now)), locations[0])


def mark_failed(opsdb: OpsDB, config: Config, location_id: int, reason: str,
                now: datetime | None = None) -> None:
    """Record a location-level failure: unhealthy for the configured time, failing since the
    first such failure after its last success."""
    now = now or utcnow()
    hold = timedelta(minutes=config.settings.policies.location_unhealthy_minutes)
    with opsdb.session() as session:
        location = session.get_one(DataLocation, location_id)
        location.failing_since = location.failing_since or now
        location.unhealthy_until = now + hold
        location.unhealthy_reason = " ".join(reason.split())[:1000]


def mark_ok(session: Session, location_id: int) -> None:
    """A write there succeeded: healthy again (cheap when it already was), unless its failure
    is a copy there its disk failed to read that is still unread (`_unread_copy`): a write
    says nothing of that file."""
    if _unread_copy(session, location_id):
        return
    session.execute(update(DataLocation).where(
        DataLocation.id == location_id, DataLocation.failing_since.is_not(None))
        .values(failing_since=None, unhealthy_until=None, unhealthy_reason=None)
        .execution_options(synchronize_session=False))


# How every read-failure mark starts (mark_unreadable_source, replicas.reread, the purge's
# look): the copy its disk failed to read.
_NAMED_COPY = re.compile(r"copy (\d+) at ")


def _unread_copy(session: Session, location_id: int) -> bool:
    """Whether the location is marked for a copy there its disk failed to read that is still
    known unreadable: present, and not read intact (verified: its check, the scrub, the
    purge's look) since the location began failing. Its mark, and the notice of its disk
    (`source_reads_failing`, `failing_disks`, `archive_disks_failing`), stay until that copy
    reads or is gone; a success with another file there says nothing of it."""
    row = session.execute(select(DataLocation.failing_since, DataLocation.unhealthy_reason)
                          .where(DataLocation.id == location_id,
                                 DataLocation.failing_since.is_not(None),
                                 read_failure_reason())).first()
    if row is None or (named := _NAMED_COPY.match(row[1] or "")) is None:
        return False
    copy = session.get(PhysicalCopy, int(named[1]))
    return (copy is not None and copy.location_id == location_id
            and copy.status == CopyStatus.PRESENT
            and (copy.verified_at is None or _aware(copy.verified_at) <= _aware(row[0])))


def read_failure_reason() -> ColumnElement[bool]:
    """SQL: the location's recorded failure is one file its disk failed to read (an I/O
    error): its other files are read as ever (the scrub, a purge's look)."""
    return or_(DataLocation.unhealthy_reason.ilike(f"%{UNREADABLE}%"),
               DataLocation.unhealthy_reason.contains(_SOURCE_READ))


def mark_readable(session: Session, location_id: int) -> None:
    """A file read fine there: a failure recorded for a read (an I/O error, the location not
    reached as a source: SOURCE_DOWN) is over, not one recorded for a write (a full disk is
    read as ever), nor one for a copy still unread (`_unread_copy`: another file read fine says
    nothing of it)."""
    if _unread_copy(session, location_id):
        return
    session.execute(update(DataLocation).where(
        DataLocation.id == location_id, DataLocation.failing_since.is_not(None),
        or_(read_failure_reason(), DataLocation.unhealthy_reason.contains(SOURCE_DOWN)))
        .values(failing_since=None, unhealthy_until=None, unhealthy_reason=None)
        .execution_options(synchronize_session=False))


def unhealthy(session: Session, now: datetime) -> list[DataLocation]:
    """Locations passed over now, for `status` and `why`."""
    rows = session.scalars(select(DataLocation).where(DataLocation.unhealthy_until.is_not(None))
                           .order_by(DataLocation.id))
    return [loc for loc in rows if not is_healthy(loc, now)]


def describe(location: DataLocation) -> str:
    until = _aware(location.unhealthy_until) if location.unhealthy_until else None
    since = _aware(location.failing_since) if location.failing_since else None
    return (f"{location.label} unhealthy until {until:%H:%M} UTC" if until else location.label) \
        + (f" (failing since {since:%Y-%m-%d %H:%M} UTC)" if since else "") \
        + f", because {location.unhealthy_reason or 'it failed'}"


def sites_down(session: Session, config: Config, now: datetime) -> dict[str, DataLocation]:
    """Archive sites every buffer of which has failed, without a success since, for longer
    than `policies.site_failover_hours`: site -> its most recently failing buffer (its reason
    and since when). Packages not yet sent go to another archive site instead. A buffer marked
    for one file its disk failed to read (`read_failed`) is written to as ever: not down."""
    horizon = timedelta(hours=config.settings.policies.site_failover_hours)
    by_site: dict[str, list[DataLocation]] = {
        site.short_name: [] for site in config.settings.archive_sites}
    for location, site in session.execute(  # one query for all sites
            select(DataLocation, Site.short_name).join(Site)
            .where(Site.short_name.in_(by_site), DataLocation.location_type == LocationType.BUFFER)
            .order_by(DataLocation.id)).tuples():
        by_site[site].append(location)
    down: dict[str, DataLocation] = {}
    for site, buffers in by_site.items():
        if buffers and all(loc.failing_since is not None and not read_failed(loc)
                           and _aware(now) - _aware(loc.failing_since) >= horizon
                           for loc in buffers):
            down[site] = max(buffers, key=lambda loc: _aware(loc.failing_since or now))
    return down


def archives_unreadable(session: Session, config: Config, now: datetime) -> list[DataLocation]:
    """Long-term archive locations that have failed as a whole (unreachable, root or bucket
    marker gone, refused), without a success since, for longer than
    `policies.site_failover_hours`: their copies are neither re-checked nor relied on for a
    deletion, and a loss there cannot be seen. Nothing heals that but a person. A full or
    read-only one is not among them: it is read as ever (`refusing_locations`); nor one whose
    disk failed an operation or a file's read (`archive_disks_failing`)."""
    return [location for location in _archives_failing(session, config, now)
            if refuses_writes(location) is None and not disk_errs(location)]


def archive_disks_failing(session: Session, config: Config, now: datetime
                          ) -> list[DataLocation]:
    """Long-term archive locations whose disk failed an operation or a file's read (an I/O
    error: a bad sector, a failing disk; `disk_errs`), without a success there since, for
    longer than `policies.site_failover_hours`: mounted and answering, a disk a person must
    look at (whether or not it failed again meanwhile: `failing_disks`)."""
    return [location for location in _archives_failing(session, config, now)
            if disk_errs(location)]


def _archives_failing(session: Session, config: Config, now: datetime) -> list[DataLocation]:
    horizon = timedelta(hours=config.settings.policies.site_failover_hours)
    return [location for location in session.scalars(select(DataLocation).where(
        DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE,
        DataLocation.failing_since.is_not(None)).order_by(DataLocation.id))
        if _aware(now) - _aware(location.failing_since or now) >= horizon]

"""Where a package goes next: out of the observatory once, then between archives."""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dt.config import Config
from ccat_dt.health import sites_down, unreachable
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PhysicalCopy,
    RawDataPackage,
    Site,
    _aware,
    utcnow,
)
from ccat_dt.transports.base import SOURCE_UNREADABLE, refused_source


def next_primary_site(session: Session, config: Config,
                      avoid: Collection[str] | None = None) -> Site:
    """Round-robin over archive sites, passing over those down past the failover horizon
    (`avoid`, default: ccat_dt/health.sites_down) while another is up; the last assignment
    lives in OpsDB, so restarts keep it."""
    order = [site.short_name for site in config.settings.archive_sites]
    last = session.scalar(select(Site.short_name).join(RawDataPackage,
                          RawDataPackage.primary_site_id == Site.id)
                          .order_by(RawDataPackage.id.desc()).limit(1))
    index = (order.index(last) + 1) % len(order) if last in order else 0
    down = set(sites_down(session, config, utcnow()) if avoid is None else avoid)
    rotation = order[index:] + order[:index]
    chosen = next((name for name in rotation if name not in down), rotation[0])
    site = session.scalar(select(Site).where(Site.short_name == chosen))
    assert site is not None, "topology not synced: run `ccat-dt init`"
    return site


def copies_at(session: Session, package: RawDataPackage, kind: LocationType,
              site: str | None = None) -> list[PackageCopy]:
    query = (select(PackageCopy).join(DataLocation).join(Site)
             .where(PackageCopy.package_id == package.id, DataLocation.location_type == kind)
             .order_by(PackageCopy.id))
    if site is not None:
        query = query.where(Site.short_name == site)
    return list(session.scalars(query))


def has_left_observatory(session: Session, config: Config, package: RawDataPackage) -> bool:
    """True once any copy (even a since-deleted one) was made outside the observatory."""
    return session.scalar(
        select(PackageCopy.id).join(DataLocation).join(Site)
        .where(PackageCopy.package_id == package.id,
               Site.short_name != config.settings.observatory).limit(1)) is not None


def replication_source(session: Session, config: Config, package: RawDataPackage,
                       site: str) -> PackageCopy | None:
    """The verified copy that `site` should receive the package from, or None if not yet.

    The primary archive site is fed from the observatory buffer; every other archive site (and
    any later repair) from a verified LTA copy at another archive, cheapest route first. The
    observatory link is used once per package, unless what left was lost before any archive
    held it (its only copy outside quarantined, say): then the primary site is fed again.
    A copy whose disk failed its read as the source (`unreadable_copies`) is passed over for
    another readable one, at another archive's buffer if no LTA copy is, while there is one.
    """
    if has_left_observatory(session, config, package):
        nearest = nearest_lta_copy(session, config, package, site)
        if nearest is not None and nearest.id in unreadable_copies(session, package):
            buffered = [c for c in copies_at(session, package, LocationType.BUFFER)
                        if c.is_verified and c.location.site.short_name
                        not in (site, config.settings.observatory)]
            nearest = readable_first(session, package, [nearest, *by_cost(config, buffered,
                                                                           site)])
        if nearest is not None or any(c.is_verified for c in copies_at(
                session, package, LocationType.LONG_TERM_ARCHIVE)):
            return nearest
    if site != package.primary_site.short_name:
        return None
    buffered = [c for c in copies_at(session, package, LocationType.BUFFER,
                                     config.settings.observatory) if c.is_verified]
    return buffered[0] if buffered else None


def nearest_lta_copy(session: Session, config: Config, package: RawDataPackage,
                     site: str) -> PackageCopy | None:
    """The verified LTA copy at another archive site on the cheapest route to `site`, passing
    over one its disk failed to read as a source while another can be read."""
    candidates = [c for c in copies_at(session, package, LocationType.LONG_TERM_ARCHIVE)
                  if c.is_verified and c.location.site.short_name != site]
    return readable_first(session, package, by_cost(config, candidates, site))


def by_cost(config: Config, copies: list[PackageCopy], site: str) -> list[PackageCopy]:
    """The copies cheapest route to `site` first (a copy at `site` itself costs nothing)."""
    def cost(copy: PackageCopy) -> int:
        origin = copy.location.site.short_name
        if origin == site:
            return 0
        route = config.settings.route(origin, site)
        return route.cost if route else 1 << 30

    return sorted(copies, key=cost)


def readable_first(session: Session, package: RawDataPackage,
                   ranked: list[PackageCopy]) -> PackageCopy | None:
    """The first of the verified copies `ranked` (best source first) that is not known
    unreadable (`unreadable_copies`) and whose location is not down now (health.unreachable:
    an archive not reached as a source, its disk unmounted, its host or endpoint refusing,
    until its hold ends); when every one not known unreadable is down, the one marked down
    longest ago (each re-attempt tries the next, so the first to come back is read); when every
    one is known unreadable, the first (its re-attempt waits for the disk to read again, as
    nothing else can feed it)."""
    if len(ranked) < 2:
        return ranked[0] if ranked else None
    unreadable, now = unreadable_copies(session, package), utcnow()
    readable = [c for c in ranked if c.id not in unreadable] or ranked
    return next((c for c in readable if not unreachable(c.location, now)), None) or min(
        readable, key=lambda c: _aware(c.location.unhealthy_until or now))


# The operations that read their source location's copy of the package.
_READS_SOURCE = (OperationType.TRANSFER, OperationType.ARCHIVE, OperationType.STAGING)


def unreadable_copies(session: Session, package: RawDataPackage) -> set[int]:
    """The ids of `unreadable_reads`."""
    return set(unreadable_reads(session, package))


def unreadable_reads(session: Session, package: RawDataPackage) -> dict[int, Operation]:
    """The package's copies (by id, with the read that failed) whose last use as the source
    of a transfer, an archiving or a staging failed because they could not be read
    (SOURCE_UNREADABLE: a bad sector, or the file refused to ccat-dt's user for lack of
    permission, which a person may fix any time: such a copy is still the one sent when no
    other can be, so the fix is picked up by the next automatic attempt), not read fine since
    (a later transfer from there, or a re-read that verified the copy).
    Such a copy is not proved bad, so it stays PRESENT and is never deleted or written over on
    that word; the next attempt is sent from another verified copy instead of waiting for a
    disk that does not heal by itself, and the purge re-reads it before relying on it
    (recheck.py). A disk that failed the read marks the copy's location and is told to a
    person at once (health.mark_unreadable_source); `why` names the copy (diagnosis.py)."""
    last: dict[int, Operation] = {}  # by source location: its latest finished read
    for operation in session.scalars(select(Operation).where(
            Operation.package_id == package.id, Operation.operation_type.in_(_READS_SOURCE),
            Operation.source_location_id.is_not(None), Operation.finished_at.is_not(None))
            .order_by(Operation.finished_at, Operation.id)):
        assert operation.source_location_id is not None
        last[operation.source_location_id] = operation
    failed = {location: operation for location, operation in last.items()
              if operation.status == OperationStatus.FAILED
              and SOURCE_UNREADABLE in (operation.error or "")}
    if not failed:
        return {}
    out: dict[int, Operation] = {}
    for copy in package.copies:
        when = failed[copy.location_id].finished_at if copy.location_id in failed else None
        if when is not None and (copy.verified_at is None
                                 or _aware(copy.verified_at) <= _aware(when)):
            out[copy.id] = failed[copy.location_id]
    return out


def refused_reread(session: Session, copy: PhysicalCopy) -> Operation | None:
    """The copy's last re-read (replicas.reread: its check, the scrub), when it was refused to
    ccat-dt's user for lack of permission and nothing has read the copy fine since; else None.
    Such a copy is left as it is (PRESENT, its location not marked): only a person grants the
    permission (notify.py tells it; `why` shows it)."""
    if copy.status != CopyStatus.PRESENT or copy.package_id is None:
        return None
    last = session.scalars(select(Operation).where(
        Operation.package_id == copy.package_id, Operation.copy_id == copy.id,
        Operation.operation_type == OperationType.VERIFICATION,
        Operation.finished_at.is_not(None))
        .order_by(Operation.finished_at.desc(), Operation.id.desc()).limit(1)).first()
    if (last is None or last.finished_at is None or last.status != OperationStatus.FAILED
            or not refused_source(last.error or "")):
        return None
    if copy.verified_at is not None and _aware(copy.verified_at) > _aware(last.finished_at):
        return None
    return last

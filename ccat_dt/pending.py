"""What the sensors ask OpsDB: which work became possible since the last tick.

Each query pages by monotonic ids (the sensor's cursor), so a tick stays short however large
the archive grows.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dt.config import Config
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    PackageCopy,
    RawDataPackage,
    StagingRequest,
)
from ccat_dt.routing import copies_at

PAGE = 500


@dataclass(frozen=True)
class Page:
    """Work found after a cursor, and where the next tick should continue."""

    items: list[tuple[str, str]]  # (package, site); site is "" for per-package work
    cursor: int


def new_packages(session: Session, after_id: int, limit: int = PAGE) -> Page:
    rows = session.execute(select(RawDataPackage.id, RawDataPackage.name)
                           .where(RawDataPackage.id > after_id)
                           .order_by(RawDataPackage.id).limit(limit)).all()
    return Page([(name, "") for _, name in rows], rows[-1][0] if rows else after_id)


def new_staging_requests(session: Session, after_id: int, limit: int = PAGE) -> Page:
    rows = session.execute(select(StagingRequest.id, StagingRequest.name)
                           .where(StagingRequest.id > after_id)
                           .order_by(StagingRequest.id).limit(limit)).all()
    return Page([(name, "") for _, name in rows], rows[-1][0] if rows else after_id)


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
    due: list[tuple[str, str]] = []
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
        due += [(package.name, t) for t in targets if not _held_at(session, package, t)]
    return Page(due, copies[-1].id if copies else after_id)


def lta_copies_due(session: Session, config: Config, after_id: int, limit: int = PAGE) -> Page:
    """A verified copy in an archive site's buffer is archived into that site's LTA."""
    copies = _new_copies(session, after_id, LocationType.BUFFER, limit)
    due = [(c.package.name, c.location.site.short_name) for c in copies
           if c.is_verified and c.location.site.short_name != config.settings.observatory]
    return Page(due, copies[-1].id if copies else after_id)


def _held_at(session: Session, package: RawDataPackage, site: str) -> bool:
    return any(c.status != CopyStatus.DELETED
               for kind in (LocationType.BUFFER, LocationType.LONG_TERM_ARCHIVE)
               for c in copies_at(session, package, kind, site))

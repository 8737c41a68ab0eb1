"""Where a package goes next: out of the observatory once, then between archives."""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dt.config import Config
from ccat_dt.health import sites_down
from ccat_dt.opsdb.models import (
    DataLocation,
    LocationType,
    PackageCopy,
    RawDataPackage,
    Site,
    utcnow,
)


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
    """
    if has_left_observatory(session, config, package):
        nearest = nearest_lta_copy(session, config, package, site)
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
    """The verified LTA copy at another archive site on the cheapest route to `site`."""
    candidates = [c for c in copies_at(session, package, LocationType.LONG_TERM_ARCHIVE)
                  if c.is_verified and c.location.site.short_name != site]

    def cost(copy: PackageCopy) -> int:
        route = config.settings.route(copy.location.site.short_name, site)
        return route.cost if route else 1 << 30

    return min(candidates, key=cost, default=None)

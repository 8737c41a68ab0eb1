"""Buffer forecast: how many hours until each buffer (and instrument disk) is full.

A buffer fills with what arrives and drains as copies are purged after archiving; when the
network or an archive stalls, draining stops and the observatory has a bounded number of hours
before data taking must stop. The rates come from OpsDB over a recent window (a few grouped
queries, never a walk over all copies); free space comes from the disk, injected so that tests
and remote locations need no real file system.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session, contains_eager

from ccat_dt.opsdb.models import DataLocation, LocationType, PhysicalCopy, RawDataFile, Site
from ccat_dt.purge_cycle import measure

FORECAST_KINDS = (LocationType.SOURCE, LocationType.BUFFER)


@dataclass(frozen=True)
class BufferForecast:
    """Fill and drain rates of one location over the window, and what they mean for its disk."""

    location: str  # site/location, as the `buffer` tag of ccat_buffer
    free_bytes: int | None  # None: not measurable from here (remote, or root missing)
    fill_rate_bytes_per_h: float
    drain_rate_bytes_per_h: float
    hours_until_full: float | None  # None: not filling faster than draining, or free unknown
    below_threshold: bool  # full sooner than `warn_below_hours`

    @property
    def net_rate_bytes_per_h(self) -> float:
        return self.fill_rate_bytes_per_h - self.drain_rate_bytes_per_h


def local_free_bytes(location: DataLocation) -> int | None:
    """Free bytes of a location's disk when it is mounted here; None for remote, missing or
    unmounted roots (see `measure`).

    A remote root would need an ssh round trip per forecast; its site measures it instead.
    """
    usage = measure(location)
    return None if usage is None else usage.available


def forecast_buffers(session: Session, now: datetime, *, window: timedelta = timedelta(hours=6),
                     free_space: Callable[[DataLocation], int | None] = local_free_bytes,
                     warn_below_hours: float = 24.0) -> list[BufferForecast]:
    """Forecast every SOURCE and BUFFER location, ordered by site and location name.

    Arrivals are counted where they are first known: at a source, and at the observatory's
    primary buffer (a buffer at a site with sources), they are the raw bytes filed in the
    window, since packaging only repackages those bytes and may lag behind or be stalled; at
    every other buffer they are the bytes of copies created there. Departures are the bytes of
    copies whose `deleted_at` falls in the window. The window is (now - window, now].
    """
    if window <= timedelta(0):
        raise ValueError(f"window must be positive, got {window}")
    end = _utc(now)
    start = end - window
    hours = window.total_seconds() / 3600.0

    # Each with its site (read by the disk's marker check): no query per location for it.
    rows = session.scalars(
        select(DataLocation).join(DataLocation.site).options(contains_eager(DataLocation.site))
        .where(DataLocation.location_type.in_(FORECAST_KINDS))
        .order_by(Site.short_name, DataLocation.name)).all()
    if not rows:
        return []
    ids = [location.id for location in rows]

    created_in = and_(PhysicalCopy.created_at > start, PhysicalCopy.created_at <= end)
    deleted_in = and_(PhysicalCopy.deleted_at > start, PhysicalCopy.deleted_at <= end)
    copies: dict[int, tuple[int, int]] = {
        location_id: (int(created), int(deleted))
        for location_id, created, deleted in session.execute(
            select(PhysicalCopy.location_id,
                   func.coalesce(func.sum(case((created_in, PhysicalCopy.size), else_=0)), 0),
                   func.coalesce(func.sum(case((deleted_in, PhysicalCopy.size), else_=0)), 0))
            .where(PhysicalCopy.location_id.in_(ids), or_(created_in, deleted_in))
            .group_by(PhysicalCopy.location_id))}
    filed: dict[int, int] = {
        location_id: int(size)
        for location_id, size in session.execute(
            select(RawDataFile.source_location_id, func.sum(RawDataFile.size))
            .where(RawDataFile.filed_at > start, RawDataFile.filed_at <= end)
            .group_by(RawDataFile.source_location_id))}

    filed_by_site: dict[int, int] = {}
    for location in rows:
        if location.location_type == LocationType.SOURCE:
            filed_by_site[location.site_id] = (filed_by_site.get(location.site_id, 0)
                                               + filed.get(location.id, 0))
    observatory_buffers = _primary_buffers(
        [location for location in rows if location.site_id in filed_by_site])

    forecasts = []
    for location in rows:
        created, deleted = copies.get(location.id, (0, 0))
        if location.location_type == LocationType.SOURCE:
            arrived = filed.get(location.id, 0)
        elif location.id in observatory_buffers:
            arrived = filed_by_site[location.site_id]
        else:
            arrived = created
        forecasts.append(_forecast(location.label, free_space(location),
                                   arrived / hours, deleted / hours, warn_below_hours))
    return forecasts


def _forecast(label: str, free: int | None, fill: float, drain: float,
              warn_below_hours: float) -> BufferForecast:
    net = fill - drain
    left = None if free is None or net <= 0 else max(free, 0) / net
    return BufferForecast(location=label, free_bytes=free, fill_rate_bytes_per_h=fill,
                          drain_rate_bytes_per_h=drain, hours_until_full=left,
                          below_threshold=left is not None and left < warn_below_hours)


def _primary_buffers(locations: list[DataLocation]) -> set[int]:
    """The buffer packaging writes to at each site (highest priority, then name, as topology)."""
    best: dict[int, DataLocation] = {}
    for location in locations:
        if location.location_type != LocationType.BUFFER:
            continue
        current = best.get(location.site_id)
        if current is None or ((-location.priority, location.name)
                               < (-current.priority, current.name)):
            best[location.site_id] = location
    return {location.id for location in best.values()}


def _utc(moment: datetime) -> datetime:
    # OpsDB stores UTC; SQLite compares the naive text, so the bound must be UTC too.
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)

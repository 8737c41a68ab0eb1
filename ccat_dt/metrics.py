"""Metrics for dashboards and alerts: transfers, stages, locations and the service level.

Points go to an InfluxDB line-protocol endpoint (InfluxDB 2 or VictoriaMetrics) through
influxdb-client's batching writer, so a transfer only ever appends to an in-memory queue: a slow
or dead metrics server must never slow down or fail the movement of data. Points that cannot be
written are dropped and counted; an outage is logged once, not once per batch. The schema is
documented in docs/metrics.md. OpsDB stays the record of every package; metrics carry no
per-package series (that cardinality grows without bound).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_dt import progress as progress_events
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    RawDataFile,
    RawDataPackage,
    Site,
)
from ccat_dt.opsdb.totals import read as read_totals

if TYPE_CHECKING:  # the client library is imported only when metrics are on: `status` is faster
    from influxdb_client import InfluxDBClient, Point
    from influxdb_client.client.write_api import WriteApi
    from reactivex.scheduler import ThreadPoolScheduler

log = logging.getLogger(__name__)

TRANSFER = "ccat_transfer"
STAGE = "ccat_stage"
LOCATION = "ccat_location"
LOCATION_COPIES = "ccat_location_copies"
SERVICE_LEVEL = "ccat_service_level"
BUFFER = "ccat_buffer"
PROGRESS = "ccat_progress"
_STALE_SLOT_S = 600.0  # work that stopped reporting without finishing (it failed) frees its slot

_LIBRARY_LOGGER = "influxdb_client.client.write_api"


@dataclass(frozen=True)
class MetricsSettings:
    """Where metrics go; `url=None` switches them off (the embedded default)."""

    url: str | None
    org: str = "ccat"
    bucket: str = "ccat_dt"
    token_env: str = "CCAT_DT_INFLUX_TOKEN"  # the token is a secret: never in the config file
    batch_size: int = 500
    flush_interval_ms: int = 1000
    timeout_ms: int = 2000


class _QuietBatchErrors(logging.Filter):
    """The library logs an ERROR per failed batch; Metrics reports an outage once instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("The batch item wasn't processed successfully")


_quiet = _QuietBatchErrors()


class Metrics:
    """Fire-and-forget writer of the points described in docs/metrics.md."""

    def __init__(self, settings: MetricsSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._dropped = 0
        self._outage = False
        self._client: InfluxDBClient | None = None
        self._api: WriteApi | None = None
        self._sender: ThreadPoolScheduler | None = None  # the thread sending self._api's batches
        self._slots: dict[int, tuple[int, float]] = {}  # work -> (slot, last seen)
        self._unwatch: Callable[[], None] | None = None
        if settings.url is None:
            return
        from influxdb_client import InfluxDBClient

        logging.getLogger(_LIBRARY_LOGGER).addFilter(_quiet)  # idempotent: same object
        self._client = InfluxDBClient(url=settings.url,
                                      token=os.environ.get(settings.token_env, ""),
                                      org=settings.org, timeout=settings.timeout_ms)
        self._api = self._new_api()

    @classmethod
    def disabled(cls) -> Metrics:
        """Metrics that write nothing, so callers never need to check whether metrics are on."""
        return cls(MetricsSettings(url=None))

    @property
    def enabled(self) -> bool:
        return self._client is not None

    @property
    def dropped(self) -> int:
        """Points given up on since start (server down, refused, or written after close)."""
        with self._lock:
            return self._dropped

    # -- points -------------------------------------------------------------------------------

    def transfer(self, route: str, origin: str, destination: str, transport: str, bytes: int,
                 seconds: float, streams: int, attempts: int, outcome: str,
                 package: str) -> None:
        """One finished transfer of a package between sites (after all its attempts)."""

        def build() -> list[Point]:
            from influxdb_client import Point

            rate = bytes / seconds / 1e6 if seconds > 0 else 0.0
            return [Point(TRANSFER).tag("route", route).tag("origin_site", origin)
                    .tag("destination_site", destination).tag("transport", transport)
                    .tag("outcome", outcome)
                    .field("bytes", int(bytes)).field("seconds", float(seconds))
                    .field("rate_mb_s", float(rate)).field("streams", int(streams))
                    .field("attempts", int(attempts))]

        self._emit(build, f"transfer of {package}")

    def stage(self, stage: str, outcome: str, seconds: float, package: str) -> None:
        """One pipeline step (packaging, transfer, archive, verification, ...) finished."""

        def build() -> list[Point]:
            from influxdb_client import Point

            return [Point(STAGE).tag("stage", stage).tag("outcome", outcome)
                    .field("seconds", float(seconds))]

        self._emit(build, f"{stage} of {package}")

    def location(self, site: str, location: str, kind: str, used_bytes: int | None,
                 free_bytes: int | None, copies_by_status: dict[str, int], *,
                 present_bytes: int | None = None) -> None:
        """A snapshot of one storage location: disk use and OpsDB copies by status."""

        def build() -> list[Point]:

            tags = {"site": site, "location": location, "kind": kind}
            points = []
            fields = {"used_bytes": used_bytes, "free_bytes": free_bytes,
                      "present_bytes": present_bytes}
            if any(value is not None for value in fields.values()):  # no fields: no point
                point = _tagged(LOCATION, tags)
                for name, value in fields.items():
                    if value is not None:
                        point.field(name, int(value))
                points.append(point)
            for status, count in sorted(copies_by_status.items()):
                points.append(_tagged(LOCATION_COPIES, {**tags, "status": str(status)})
                              .field("count", int(count)))
            return points

        self._emit(build, f"location {site}/{location}")

    def service_level(self, packages_unsafe: int, bytes_unsafe: int, oldest_unsafe_age_s: float,
                      buffer_hours_left: dict[str, float | None], *, packages_lost: int = 0,
                      packages_at_risk: int = 0) -> None:
        """How much data is not yet safe (or lost, or at risk), and how long each buffer lasts
        if nothing leaves."""

        def build() -> list[Point]:
            from influxdb_client import Point

            points = [Point(SERVICE_LEVEL).field("packages_unsafe", int(packages_unsafe))
                      .field("bytes_unsafe", int(bytes_unsafe))
                      .field("oldest_unsafe_age_s", float(oldest_unsafe_age_s))
                      .field("packages_lost", int(packages_lost))
                      .field("packages_at_risk", int(packages_at_risk))]
            return points + [Point(BUFFER).tag("buffer", buffer).field("hours_left", float(hours))
                             for buffer, hours in sorted(buffer_hours_left.items())
                             if hours is not None]

        self._emit(build, "service level")

    def progress(self, event: progress_events.ProgressEvent) -> None:
        """Work still running (a transfer, packaging, the scrub): how far it is, now.

        Tagged by stage, its labels (site, route) and a `slot`, the smallest number not used by
        other work running at the same time: concurrent transfers on one route stay separate
        series, and the number of series stays bounded (no package names, see docs/metrics.md).
        """
        slot = self._slot(event)

        def build() -> list[Point]:
            point = _tagged(PROGRESS, {**dict(event.labels), "stage": event.stage,
                                       "slot": str(slot)})
            point.field("done_bytes", int(event.done_bytes))
            if event.total_bytes:
                point.field("total_bytes", int(event.total_bytes))
            if event.percent is not None:
                point.field("percent", float(event.percent))
            return [point.field("rate_mb_s", float(event.bytes_per_s) / 1e6)
                    .field("finished", int(event.finished))]

        self._emit(build, f"progress of {event.name}")

    def watch_progress(self) -> None:
        """Write a `progress` point for every ccat_dt.progress event until `close()`."""
        if self.enabled and self._unwatch is None:
            self._unwatch = progress_events.add_sink(self.progress)

    def _slot(self, event: progress_events.ProgressEvent) -> int:
        now = time.monotonic()
        with self._lock:
            for work, (_, seen) in list(self._slots.items()):
                if now - seen > _STALE_SLOT_S:
                    del self._slots[work]
            slot = self._slots[event.work][0] if event.work in self._slots else min(
                set(range(len(self._slots) + 1)) - {s for s, _ in self._slots.values()})
            if event.finished:
                self._slots.pop(event.work, None)
            else:
                self._slots[event.work] = (slot, now)
        return slot

    # -- lifecycle ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what is queued now and wait for it (bounded); the writer has no real flush."""
        if not self.enabled:
            return
        with self._lock:
            old, sender = self._api, self._sender
            self._api = self._new_api() if old is not None else None
        if old is not None:
            old.close()
            _stop(sender)

    def close(self) -> None:
        """Flush and release the HTTP pool; later points are dropped (counted, not logged)."""
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        with self._lock:
            api, self._api = self._api, None
            sender, self._sender = self._sender, None
        if api is not None:  # None: disabled, or closed before
            api.close()
            _stop(sender)
            if self._client is not None:
                self._client.close()

    # -- internals ----------------------------------------------------------------------------

    def _new_api(self) -> WriteApi:
        from influxdb_client import WriteOptions
        from influxdb_client.client.write_api import WriteType
        from reactivex.scheduler import ThreadPoolScheduler

        assert self._client is not None
        s = self.settings
        # A sending thread of its own: WriteOptions' default is one scheduler shared by the
        # whole process, whose thread a process forked from it (a drive's run) does not
        # have: the run's points would wait for it forever.
        self._sender = ThreadPoolScheduler(max_workers=1)
        options = WriteOptions(write_scheduler=self._sender,
            write_type=WriteType.batching, batch_size=s.batch_size,
            flush_interval=s.flush_interval_ms, jitter_interval=0,
            max_retries=0,  # a retry queue would grow during an outage; metrics are disposable
            max_close_wait=2 * s.timeout_ms + s.flush_interval_ms)  # bounds flush() and close()
        return self._client.write_api(write_options=options, success_callback=self._written,
                                      error_callback=self._failed)

    def _emit(self, build: Callable[[], list[Point]], about: str) -> None:
        if not self.enabled:
            return
        try:
            points = build()
        except Exception:  # noqa: BLE001 - a bad value is a bug to see, not a reason to fail
            log.warning("metrics point for %s dropped: cannot build it", about, exc_info=True)
            with self._lock:
                self._dropped += 1
            return
        from influxdb_client import WritePrecision

        now = datetime.now(UTC)  # stamped here: batching must not shift the time of a point
        for point in points:
            point.time(now, WritePrecision.MS)
        try:
            with self._lock:
                if self._api is None:  # closed
                    self._dropped += len(points)
                    return
                self._api.write(bucket=self.settings.bucket, org=self.settings.org,
                                record=points)  # each point carries its precision
        except Exception as exc:  # noqa: BLE001 - metrics must never break a transfer
            self._failed((), b"\n".join(p.to_line_protocol().encode() for p in points), exc)

    def _written(self, _key: tuple[Any, ...], _data: Any) -> None:
        with self._lock:
            recovered, self._outage = self._outage, False
            dropped = self._dropped
        if recovered:
            log.info("metrics server %s answers again (%d points dropped so far)",
                     self.settings.url, dropped)

    def _failed(self, _key: tuple[Any, ...], data: Any, exc: BaseException) -> None:
        if isinstance(data, str):
            data = data.encode()
        lines = data.count(b"\n") + 1 if isinstance(data, bytes) and data else 0
        with self._lock:
            self._dropped += lines
            first, self._outage = not self._outage, True
        if first:
            log.warning("metrics server %s cannot take points (%s); dropping them until it "
                        "answers again, transfers are not affected",
                        self.settings.url, _short(exc))


def _stop(sender: ThreadPoolScheduler | None) -> None:
    if sender is not None:
        sender.executor.shutdown(wait=False)


def _tagged(measurement: str, tags: dict[str, str]) -> Point:
    from influxdb_client import Point

    point = Point(measurement)
    for key, value in tags.items():
        point.tag(key, value)
    return point


def _short(exc: BaseException) -> str:
    text = f"{exc.__class__.__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


# -- figures from OpsDB ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceLevel:
    """Data not yet in enough verified long-term archive copies: the risk still open."""

    packages_unsafe: int
    bytes_unsafe: int
    oldest_unsafe_age_s: float  # 0.0 when nothing is unsafe
    oldest_unsafe_package: str | None


@dataclass(frozen=True)
class LocationFigures:
    site: str
    location: str
    kind: str  # LocationType value
    copies_by_status: dict[str, int]  # every CopyStatus value, zero-filled
    present_bytes: int

    @property
    def label(self) -> str:
        return f"{self.site}/{self.location}"


def service_level_figures(session: Session, required_lta_copies: int,
                          now: datetime) -> ServiceLevel:
    """Count packages lacking `required_lta_copies` verified LTA copies at distinct sites.

    Derived from copies, not from package state, like `replicas.refresh_state`: every package
    counts (planned and failed ones too) until its copies prove it safe. The database keeps
    each package's count of such sites from its copies (ccat_dt/opsdb/archived_sites.py), so
    this reads the unsafe packages by their index, however many are archived. Bytes of a
    package not yet built are the sum of its files (by their index).
    """
    files = (select(func.sum(RawDataFile.size)).where(RawDataFile.package_id == RawDataPackage.id)
             .scalar_subquery())
    unsafe = (
        select(RawDataPackage.name, RawDataPackage.created_at,
               func.coalesce(RawDataPackage.size, files, 0).label("size"))
        .where(RawDataPackage.verified_lta_sites < required_lta_copies)
        .subquery())
    oldest = session.execute(  # the oldest, with the count and bytes of all: one query
        select(unsafe.c.name, unsafe.c.created_at, func.count().over().label("packages"),
               func.coalesce(func.sum(unsafe.c.size).over(), 0).label("bytes"))
        .order_by(unsafe.c.created_at, unsafe.c.name).limit(1)).first()
    if oldest is None:
        return ServiceLevel(0, 0, 0.0, None)
    age = (_aware(now) - _aware(oldest.created_at)).total_seconds()
    return ServiceLevel(int(oldest.packages), int(oldest.bytes), max(age, 0.0), oldest.name)


def location_figures(session: Session) -> list[LocationFigures]:
    """Copies by status and bytes present at every location, including empty ones."""
    kept = read_totals(session.connection())  # kept by the database: no count of 10^7 rows
    kinds: dict[tuple[str, str], str] = {}
    copies: dict[tuple[str, str], dict[str, int]] = {}
    present: dict[tuple[str, str], int] = {}
    for location_id, site, name, kind in session.execute(
            select(DataLocation.id, Site.short_name, DataLocation.name,
                   DataLocation.location_type).join(Site, DataLocation.site_id == Site.id)
            .order_by(Site.short_name, DataLocation.name)):
        key = (site, name)
        kinds[key] = LocationType(kind).value
        copies[key] = {s.value: kept.get(("copy", location_id, s.value), (0, 0))[0]
                       for s in CopyStatus}
        present[key] = kept.get(("copy", location_id, CopyStatus.PRESENT.value), (0, 0))[1]
    return [LocationFigures(site, name, kinds[(site, name)], copies[(site, name)],
                            present.get((site, name), 0)) for site, name in kinds]


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything OpsDB stores is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

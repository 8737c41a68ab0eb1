"""Buffer forecast: fill and drain rates from OpsDB rows spread over the window, hours until
full from injected free space, the None cases and the warning threshold, on SQLite and
PostgreSQL."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from ccat_dt.config import Config
from ccat_dt.forecast import BufferForecast, forecast_buffers, local_free_bytes
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    ExecutedObsUnit,
    InstrumentModule,
    PackageCopy,
    RawDataFile,
    RawDataFileCopy,
    RawDataPackage,
)
from ccat_dt.topology import get_location, get_site

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)
GB = 10**9
_names = itertools.count()


def _package(session: Session) -> RawDataPackage:
    observation = ExecutedObsUnit(name=f"obs{next(_names)}")
    module = session.query(InstrumentModule).first()
    assert module is not None
    package = RawDataPackage(name=f"pkg{next(_names)}", observation=observation, module=module,
                             primary_site=get_site(session, "ccat"))
    session.add(package)
    session.flush()
    return package


def _file(session: Session, size: int, filed_at: datetime) -> None:
    """A raw file filed at ccat/instruments, with its source copy, as filing makes them."""
    package = _package(session)
    source = get_location(session, "ccat", "instruments")
    name = f"f{next(_names)}.fits"
    raw = RawDataFile(source_location_id=source.id, relative_path=name, size=size,
                      checksum_algorithm="xxh64", checksum="0", observation=package.observation,
                      module=package.module, filed_at=filed_at)
    session.add(raw)
    session.add(RawDataFileCopy(location_id=source.id, relative_path=name, size=size,
                                checksum="0", created_at=filed_at, raw_data_file=raw))


def _copy(session: Session, site: str, location: str, size: int, created_at: datetime,
          deleted_at: datetime | None = None) -> None:
    session.add(PackageCopy(
        package=_package(session), location_id=get_location(session, site, location).id,
        relative_path=f"p{next(_names)}.tar", size=size, checksum="0", created_at=created_at,
        deleted_at=deleted_at,
        status=CopyStatus.DELETED if deleted_at is not None else CopyStatus.PRESENT))


def _populate(session: Session) -> None:
    # Observatory: 6 GB filed in the 6-hour window (1 h, 3 h and 5 h ago), 4 GB more outside it.
    for hours_ago, size in ((1, 1 * GB), (3, 2 * GB), (5, 3 * GB), (7, 4 * GB)):
        _file(session, size, NOW - hours_ago * H)
    # The packages built from them at ccat/buffer must not count a second time; 3 GB of older
    # packages were purged there in the window.
    _copy(session, "ccat", "buffer", 6 * GB, NOW - 2 * H)
    _copy(session, "ccat", "buffer", 3 * GB, NOW - 30 * H, deleted_at=NOW - 4 * H)
    # Cologne buffer: 12 GB arrived in the window; 6 GB left; outside-window rows are ignored.
    _copy(session, "cologne", "buffer", 4 * GB, NOW - 1 * H)
    _copy(session, "cologne", "buffer", 8 * GB, NOW - 5 * H, deleted_at=NOW - 0.5 * H)
    _copy(session, "cologne", "buffer", 2 * GB, NOW - 7 * H, deleted_at=NOW - 2 * H)
    _copy(session, "cologne", "buffer", 4 * GB, NOW - 20 * H, deleted_at=NOW - 3 * H)
    _copy(session, "cologne", "buffer", 9 * GB, NOW - 9 * H, deleted_at=NOW - 8 * H)
    _copy(session, "cologne", "buffer", 9 * GB, NOW + 1 * H)  # after now: not yet
    # US buffer: drains faster than it fills.
    _copy(session, "us", "buffer", 1 * GB, NOW - 1 * H)
    _copy(session, "us", "buffer", 5 * GB, NOW - 10 * H, deleted_at=NOW - 1 * H)
    # Archives are not buffers: never forecast.
    _copy(session, "cologne", "lta", 100 * GB, NOW - 1 * H)
    session.flush()


FREE = {"ccat/instruments": 50 * GB, "ccat/buffer": 10 * GB, "cologne/buffer": 60 * GB,
        "us/buffer": 5 * GB}


def _free(location: DataLocation) -> int | None:
    return FREE.get(location.label)


def _by_label(forecasts: list[BufferForecast]) -> dict[str, BufferForecast]:
    return {f.location: f for f in forecasts}


def _check(opsdb: OpsDB) -> None:
    with opsdb.session() as session:
        _populate(session)
        forecasts = forecast_buffers(session, NOW, free_space=_free)

    assert [f.location for f in forecasts] == ["ccat/buffer", "ccat/instruments",
                                               "cologne/buffer", "us/buffer"]
    by = _by_label(forecasts)

    source = by["ccat/instruments"]  # 6 GB filed in 6 h; nothing deleted
    assert source.fill_rate_bytes_per_h == pytest.approx(1 * GB)
    assert source.drain_rate_bytes_per_h == 0.0
    assert source.hours_until_full == pytest.approx(50.0)
    assert not source.below_threshold

    observatory = by["ccat/buffer"]  # filed bytes arrive (1 GB/h), 3 GB purged (0.5 GB/h)
    assert observatory.fill_rate_bytes_per_h == pytest.approx(1 * GB)
    assert observatory.drain_rate_bytes_per_h == pytest.approx(0.5 * GB)
    assert observatory.hours_until_full == pytest.approx(20.0)
    assert observatory.below_threshold

    cologne = by["cologne/buffer"]  # (4 + 8) / 6 = 2 GB/h in, (8 + 2 + 4) / 6 out
    assert cologne.fill_rate_bytes_per_h == pytest.approx(2 * GB)
    assert cologne.drain_rate_bytes_per_h == pytest.approx(14 * GB / 6)
    assert cologne.hours_until_full is None  # draining faster than filling
    assert not cologne.below_threshold

    us = by["us/buffer"]
    assert us.net_rate_bytes_per_h == pytest.approx((1 - 5) * GB / 6)
    assert us.hours_until_full is None and not us.below_threshold


def test_forecast_from_rows_over_the_window(opsdb: OpsDB) -> None:
    _check(opsdb)


def test_forecast_on_postgres(pg_opsdb: OpsDB) -> None:
    _check(pg_opsdb)


def test_window_and_threshold_are_parameters(opsdb: OpsDB) -> None:
    with opsdb.session() as session:
        _populate(session)
        # Over 12 h: 10 GB filed (0.83 GB/h in), 3 GB purged (0.25 GB/h out) at ccat/buffer.
        wide = _by_label(forecast_buffers(session, NOW, window=timedelta(hours=12),
                                          free_space=_free, warn_below_hours=10.0))
        # `now` may be naive (taken as UTC) and the unknown free space gives no estimate.
        naive = _by_label(forecast_buffers(session, NOW.replace(tzinfo=None),
                                           free_space=lambda _: None))
    observatory = wide["ccat/buffer"]
    assert observatory.fill_rate_bytes_per_h == pytest.approx(10 * GB / 12)
    assert observatory.drain_rate_bytes_per_h == pytest.approx(3 * GB / 12)
    assert observatory.hours_until_full == pytest.approx(10 * GB / (7 * GB / 12))  # ~17.1 h
    assert not observatory.below_threshold  # 17 h is not below 10 h

    unknown = naive["ccat/buffer"]
    assert unknown.free_bytes is None and unknown.hours_until_full is None
    assert not unknown.below_threshold
    assert unknown.fill_rate_bytes_per_h == pytest.approx(1 * GB)  # same rows as with UTC


def test_a_full_disk_that_still_fills_has_zero_hours(opsdb: OpsDB) -> None:
    with opsdb.session() as session:
        _file(session, 6 * GB, NOW - H)
        [source] = [f for f in forecast_buffers(session, NOW, free_space=lambda _: 0)
                    if f.location == "ccat/instruments"]
    assert source.hours_until_full == 0.0 and source.below_threshold


def test_an_idle_deployment_has_no_estimates(opsdb: OpsDB) -> None:
    with opsdb.session() as session:
        forecasts = forecast_buffers(session, NOW, free_space=lambda _: 10 * GB)
    assert len(forecasts) == 4
    for forecast in forecasts:
        assert forecast.fill_rate_bytes_per_h == forecast.drain_rate_bytes_per_h == 0.0
        assert forecast.free_bytes == 10 * GB
        assert forecast.hours_until_full is None and not forecast.below_threshold


def test_window_must_be_positive(opsdb: OpsDB) -> None:
    with opsdb.session() as session, pytest.raises(ValueError, match="window"):
        forecast_buffers(session, NOW, window=timedelta(0))


def test_default_free_space_reads_local_disks_only(opsdb: OpsDB, config: Config) -> None:
    with opsdb.session() as session:
        buffer = get_location(session, "ccat", "buffer")
        root = config.resolve_root("sites/ccat/buffer")
        root.mkdir(parents=True, exist_ok=True)
        assert buffer.root == str(root)
        assert isinstance(local_free_bytes(buffer), int)
        buffer.root = str(root.parent)
        assert local_free_bytes(buffer) is None  # not the marked disk: a mount point's
        buffer.root = str(root / "missing")
        assert local_free_bytes(buffer) is None  # a missing root is unknown, not an error
        buffer.root, buffer.host = "/", "buffer.example.org"
        assert local_free_bytes(buffer) is None  # remote: measured at its site

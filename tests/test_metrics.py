"""Metrics against a real VictoriaMetrics, and the service-level figures against a real OpsDB."""

from __future__ import annotations

import logging
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session

from ccat_dt.config import Config
from ccat_dt.metrics import (
    LocationFigures,
    Metrics,
    MetricsSettings,
    ServiceLevel,
    location_figures,
    service_level_figures,
)
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    ExecutedObsUnit,
    InstrumentModule,
    PackageCopy,
    PackageState,
    RawDataFile,
    RawDataFileCopy,
    RawDataPackage,
)
from ccat_dt.topology import get_location
from tests.victoria import VictoriaMetrics
from tests.victoria import victoria as victoria_fixture  # noqa: F401 - named "victoria"

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _metrics(server: VictoriaMetrics) -> Metrics:
    return Metrics(MetricsSettings(url=server.url, flush_interval_ms=100))


def _by_name(series: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["metric"]["__name__"]: s for s in series}


def _labels(series: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in series["metric"].items() if k != "__name__"}


def _unique() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


# -- points through a real server -----------------------------------------------------------------


def test_a_transfer_point_lands_as_one_series_per_field(victoria: VictoriaMetrics) -> None:
    destination = _unique()
    metrics = _metrics(victoria)
    before = int(time.time() * 1000)
    metrics.transfer(route=f"ccat->{destination}", origin="ccat", destination=destination,
                     transport="bbcp", bytes=50_000_000, seconds=2.0, streams=4, attempts=2,
                     outcome="ok", package="chai_lfa_obs1_0")
    metrics.flush()
    after = int(time.time() * 1000)
    series = _by_name(victoria.export(
        f'{{__name__=~"ccat_transfer_.*",destination_site="{destination}"}}', min_series=5))
    metrics.close()

    assert set(series) == {"ccat_transfer_bytes", "ccat_transfer_seconds",
                           "ccat_transfer_rate_mb_s", "ccat_transfer_streams",
                           "ccat_transfer_attempts"}
    for one in series.values():
        assert _labels(one) == {"route": f"ccat->{destination}", "origin_site": "ccat",
                                "destination_site": destination, "transport": "bbcp",
                                "outcome": "ok"}
        assert len(one["values"]) == 1
        assert before <= one["timestamps"][0] <= after
    values = {name: one["values"][0] for name, one in series.items()}
    assert values == {"ccat_transfer_bytes": 50_000_000, "ccat_transfer_seconds": 2.0,
                      "ccat_transfer_rate_mb_s": 25.0, "ccat_transfer_streams": 4,
                      "ccat_transfer_attempts": 2}
    assert metrics.dropped == 0


def test_a_stage_point_lands(victoria: VictoriaMetrics) -> None:
    stage = _unique()
    metrics = _metrics(victoria)
    metrics.stage(stage=stage, outcome="failed", seconds=12.5, package="p")
    metrics.close()  # close flushes too
    [series] = victoria.export(f'{{__name__="ccat_stage_seconds",stage="{stage}"}}')
    assert _labels(series) == {"stage": stage, "outcome": "failed"}
    assert series["values"] == [12.5]


def test_location_points_carry_disk_use_and_copies_by_status(victoria: VictoriaMetrics) -> None:
    site = _unique()
    metrics = _metrics(victoria)
    metrics.location(site=site, location="buffer", kind="buffer", used_bytes=700,
                     free_bytes=None, copies_by_status={"present": 3, "deleted": 0},
                     present_bytes=600)
    metrics.flush()
    usage = _by_name(victoria.export(f'{{__name__=~"ccat_location_.*_bytes",site="{site}"}}',
                                     min_series=2))
    copies = victoria.export(f'{{__name__="ccat_location_copies_count",site="{site}"}}',
                             min_series=2)
    metrics.close()

    assert set(usage) == {"ccat_location_used_bytes", "ccat_location_present_bytes"}  # no None
    assert usage["ccat_location_used_bytes"]["values"] == [700]
    assert usage["ccat_location_present_bytes"]["values"] == [600]
    assert _labels(usage["ccat_location_used_bytes"]) == {"site": site, "location": "buffer",
                                                          "kind": "buffer"}
    assert {s["metric"]["status"]: s["values"] for s in copies} == {"present": [3],
                                                                   "deleted": [0]}


def test_service_level_and_buffer_points(victoria: VictoriaMetrics) -> None:
    buffer = f"{_unique()}/buffer"
    metrics = _metrics(victoria)
    metrics.service_level(packages_unsafe=3, bytes_unsafe=530, oldest_unsafe_age_s=18000.0,
                          buffer_hours_left={buffer: 36.5, "unknown/buffer": None},
                          packages_lost=1, packages_at_risk=2)
    metrics.flush()
    level = _by_name(victoria.export('{__name__=~"ccat_service_level_.*"}', min_series=5))
    hours = victoria.export('{__name__="ccat_buffer_hours_left"}')
    metrics.close()

    assert {name: s["values"][-1] for name, s in level.items()} == {
        "ccat_service_level_packages_unsafe": 3, "ccat_service_level_bytes_unsafe": 530,
        "ccat_service_level_oldest_unsafe_age_s": 18000.0,
        "ccat_service_level_packages_lost": 1, "ccat_service_level_packages_at_risk": 2}
    assert all(_labels(s) == {} for s in level.values())
    assert {s["metric"]["buffer"]: s["values"] for s in hours} == {buffer: [36.5]}  # None: no point


def test_opsdb_figures_written_as_location_points(victoria: VictoriaMetrics,
                                                  opsdb: OpsDB) -> None:
    with opsdb.session() as session:
        _populate(session)
        figures = location_figures(session)
    metrics = _metrics(victoria)
    for figure in figures:
        metrics.location(figure.site, figure.location, figure.kind, used_bytes=None,
                         free_bytes=None, copies_by_status=figure.copies_by_status,
                         present_bytes=figure.present_bytes)
    metrics.flush()
    processing = victoria.export('{__name__="ccat_location_copies_count",site="ramses"}',
                                 min_series=len(CopyStatus))
    metrics.close()
    assert {s["metric"]["status"]: s["values"][-1] for s in processing} == {
        status.value: 0 for status in CopyStatus}


# -- a metrics server that is not there -----------------------------------------------------------


def _port_nobody_listens_on() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_dead_server_costs_points_not_transfers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # A short flush interval: the writer's window timer outlives close() by up to one interval.
    metrics = Metrics(MetricsSettings(url=f"http://127.0.0.1:{_port_nobody_listens_on()}",
                                      batch_size=1000, flush_interval_ms=200, timeout_ms=500))
    for attempt in range(3):
        metrics.transfer(route="ccat->cologne", origin="ccat", destination="cologne",
                         transport="rsync", bytes=10, seconds=1.0, streams=1, attempts=attempt,
                         outcome="ok", package="p")  # queued: no exception, whatever the server
    metrics.flush()
    assert metrics.dropped == 3
    metrics.stage(stage="transfer", outcome="ok", seconds=1.0, package="p")
    metrics.stage(stage="archive", outcome="ok", seconds=1.0, package="p")
    metrics.flush()
    assert metrics.dropped == 5

    metrics.close()
    metrics.transfer(route="ccat->cologne", origin="ccat", destination="cologne",
                     transport="rsync", bytes=10, seconds=1.0, streams=1, attempts=1,
                     outcome="ok", package="p")
    assert metrics.dropped == 6  # after close: dropped and counted, never raised
    metrics.close()  # twice is harmless

    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.name, r.levelname) for r in loud] == [("ccat_dt.metrics", "WARNING")]  # one outage
    assert "cannot take points" in loud[0].getMessage()


def test_a_bad_value_is_dropped_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics(MetricsSettings(url=f"http://127.0.0.1:{_port_nobody_listens_on()}"))
    metrics.transfer(route="a->b", origin="a", destination="b", transport="local",
                     bytes=None, seconds=1.0, streams=1, attempts=1,  # type: ignore[arg-type]
                     outcome="ok", package="p")
    metrics.close()  # nothing was queued: nothing is sent to the dead server
    assert metrics.dropped == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "metrics point for transfer of p dropped: cannot build it"]


def test_disabled_metrics_do_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for metrics in (Metrics.disabled(), Metrics(MetricsSettings(url=None))):
        assert not metrics.enabled
        metrics.transfer(route="a->b", origin="a", destination="b", transport="local", bytes=1,
                         seconds=0.0, streams=1, attempts=1, outcome="ok", package="p")
        metrics.stage(stage="packaging", outcome="ok", seconds=1.0, package="p")
        metrics.location(site="a", location="buffer", kind="buffer", used_bytes=1, free_bytes=1,
                         copies_by_status={"present": 1})
        metrics.service_level(packages_unsafe=1, bytes_unsafe=1, oldest_unsafe_age_s=1.0,
                              buffer_hours_left={"a/buffer": 1.0})
        metrics.flush()
        metrics.close()
        assert metrics.dropped == 0
    assert caplog.records == []


# -- figures from OpsDB ---------------------------------------------------------------------------


def _populate(session: Session) -> None:
    """Five packages, required_lta_copies=2 (cologne/lta, us/lta):

    old_safe   100 B  verified at both archives                      -> safe
    half       200 B  verified at cologne; us copy never verified    -> unsafe
    stale      300 B  two verified copies at cologne; us copy verified before it was rewritten
                      (verified_at < created_at)                     -> unsafe, the oldest
    planned     -     not built: two files of 10 + 20 B at the source -> unsafe, 30 B
    corrupt    400 B  verified at cologne; us copy CORRUPT; verified copy in us/buffer (not an
                      archive)                                       -> unsafe
    """
    module = session.query(InstrumentModule).filter_by(instrument="chai", name="lfa").one()
    observation = ExecutedObsUnit(name="obs1", started_at=NOW - timedelta(hours=12))
    session.add(observation)
    session.flush()
    source = get_location(session, "ccat", "instruments")
    cologne = get_location(session, "cologne", "lta")
    us = get_location(session, "us", "lta")
    us_buffer = get_location(session, "us", "buffer")

    def package(name: str, size: int | None, age_h: float, state: PackageState,
                part: int) -> RawDataPackage:
        made = RawDataPackage(name=name, observation=observation, module=module, part=part,
                              state=state, primary_site_id=source.site_id, size=size,
                              created_at=NOW - timedelta(hours=age_h))
        session.add(made)
        session.flush()
        return made

    def copy(of: RawDataPackage, location_id: int, path: str, *, verified: bool = True,
             status: CopyStatus = CopyStatus.PRESENT, stale: bool = False) -> None:
        created = NOW - timedelta(hours=1)
        checked = None if not verified else created - timedelta(minutes=5) if stale else NOW
        session.add(PackageCopy(package=of, location_id=location_id, relative_path=path,
                                size=of.size or 0, checksum="x", status=status,
                                created_at=created, verified_at=checked))

    old_safe = package("old_safe", 100, 10, PackageState.ARCHIVED, 0)
    copy(old_safe, cologne.id, "old_safe.tar")
    copy(old_safe, us.id, "old_safe.tar")
    half = package("half", 200, 3, PackageState.TRANSFERRING, 1)
    copy(half, cologne.id, "half.tar")
    copy(half, us.id, "half.tar", verified=False)
    stale = package("stale", 300, 5, PackageState.TRANSFERRING, 2)
    copy(stale, cologne.id, "stale.tar")
    copy(stale, cologne.id, "again/stale.tar")
    copy(stale, us.id, "stale.tar", stale=True)
    planned = package("planned", None, 1, PackageState.PLANNED, 3)
    for path, size in (("a.dat", 10), ("b.dat", 20)):
        raw = RawDataFile(source_location_id=source.id, relative_path=path, size=size,
                          checksum_algorithm="xxh64", checksum="x", observation=observation,
                          module=module, package=planned)
        session.add(raw)
        session.add(RawDataFileCopy(raw_data_file=raw, location_id=source.id,
                                    relative_path=path, size=size, checksum="x",
                                    created_at=NOW, verified_at=NOW))
    corrupt = package("corrupt", 400, 2, PackageState.FAILED, 4)
    copy(corrupt, cologne.id, "corrupt.tar")
    copy(corrupt, us.id, "corrupt.tar", status=CopyStatus.CORRUPT)
    copy(corrupt, us_buffer.id, "corrupt.tar")
    session.flush()


def _check_figures(opsdb: OpsDB, required: int) -> None:
    with opsdb.session() as session:
        _populate(session)
    with opsdb.session() as session:
        level = service_level_figures(session, required, NOW)
        lenient = service_level_figures(session, 1, NOW)
        figures = {f.label: f for f in location_figures(session)}

    assert level == ServiceLevel(packages_unsafe=4, bytes_unsafe=200 + 300 + 30 + 400,
                                 oldest_unsafe_age_s=5 * 3600.0, oldest_unsafe_package="stale")
    assert lenient == ServiceLevel(1, 30, 3600.0, "planned")

    zero = {status.value: 0 for status in CopyStatus}
    assert figures["cologne/lta"] == LocationFigures(
        "cologne", "lta", "long_term_archive", {**zero, "present": 5}, 100 + 200 + 300 * 2 + 400)
    assert figures["us/lta"] == LocationFigures(
        "us", "lta", "long_term_archive", {**zero, "present": 3, "corrupt": 1}, 100 + 200 + 300)
    assert figures["us/buffer"].copies_by_status == {**zero, "present": 1}
    assert figures["ccat/instruments"] == LocationFigures(
        "ccat", "instruments", "source", {**zero, "present": 2}, 30)
    assert figures["ramses/processing"] == LocationFigures(
        "ramses", "processing", "processing", zero, 0)
    assert set(figures) == {"ccat/instruments", "ccat/buffer", "cologne/buffer", "cologne/lta",
                            "us/buffer", "us/lta", "ramses/processing"}


def test_figures_on_sqlite(config: Config, opsdb: OpsDB) -> None:
    assert config.settings.required_lta_copies == 2
    _check_figures(opsdb, config.settings.required_lta_copies)


def test_nothing_unsafe_in_an_empty_opsdb(opsdb: OpsDB) -> None:
    with opsdb.session() as session:
        assert service_level_figures(session, 2, NOW) == ServiceLevel(0, 0, 0.0, None)


def test_figures_on_postgres(config: Config, pg_opsdb: OpsDB) -> None:
    _check_figures(pg_opsdb, config.settings.required_lta_copies)

"""Metrics from a real lifecycle reach a real metrics server; with the server down nothing
fails and the points are counted as dropped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dagster import DagsterInstance

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.storage import files_under
from tests.helpers import observe
from tests.services import free_port


def test_a_lifecycle_writes_transfer_stage_and_service_level_metrics(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,  # noqa: F811
        victoria, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CCAT_DT_METRICS_URL", victoria.url)
    observe(config, opsdb, observations=1, files=1)
    assert drive(build_definitions(config), instance).failed == []

    transfers = victoria.export('{__name__="ccat_transfer_bytes"}')
    routes = {series["metric"]["route"] for series in transfers}
    assert {"ccat->cologne", "ccat->us", "cologne->us", "us->cologne"} <= routes
    assert all(series["metric"]["outcome"] == "ok" for series in transfers)
    wanted = {"packaging", "transfer", "archive", "purge"}
    stages = {s["metric"]["stage"] for s in victoria.export(  # the last written takes a moment
        '{__name__="ccat_stage_seconds"}',
        until=lambda found: wanted <= {s["metric"]["stage"] for s in found})}
    assert wanted <= stages
    deadline = time.monotonic() + 20  # the newest point becomes searchable within seconds
    while True:
        unsafe = victoria.export('{__name__="ccat_service_level_packages_unsafe"}')
        if unsafe[-1]["values"][-1] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert max(unsafe[-1]["values"]) == 2  # while the packages were in flight
    assert unsafe[-1]["values"][-1] == 0  # after the run: everything is safe


def test_a_dead_metrics_server_never_fails_a_transfer(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CCAT_DT_METRICS_URL", f"http://127.0.0.1:{free_port()}")
    source = observe(config, opsdb, observations=1, files=1)
    report = drive(build_definitions(config), instance)
    assert report.failed == [] and report.launched
    assert files_under(source) == []  # the lifecycle completed

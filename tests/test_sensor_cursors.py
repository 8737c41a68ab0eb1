"""A sensor's cursor as an operator edits it on the UI's sensor page ("Edit cursor", "Clear
cursor"): text a sensor cannot read is read as a cleared cursor, with a warning, not a tick
failing until a person clears it; a cursor set ahead of OpsDB misses no work; and the edit
reaches `ccat-dt drive`, whose cursor the UI then shows."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, PreviewWarning, build_sensor_context

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import CURSOR_KEY, drive
from ccat_assets.partitions import package_site_key
from ccat_assets.runlog import log_ticks_in_tree
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.packages import plan_new_packages
from ccat_dt.pending import newest_package_id
from ccat_dt.replicas import reread
from tests.faults.pipeline import deployment
from tests.faults.pipeline import observe as observe_one
from tests.helpers import flip_byte, lta_copies_at, observe
from tests.test_operator_actions import integrity_tick

warnings.filterwarnings("ignore", category=PreviewWarning)

GARBAGE = ["abc", "{", "[]", "-5x", '{"op": "x", "swept_at": "x"}', '{"held": [1]}', "999999999",
           '{"waiting": [["no such asset", "p", 1]]}',
           '{"held": [{"asset": "no such asset", "check": "c", "partition": "p", '
           '"events_before": 1}]}']
READ = ["package_sensor", "site_copy_sensor", "lta_copy_sensor", "new_site_sensor",
        "staging_sensor", "reattempt_sensor", "integrity_sensor"]


def lta_tars(config: Config) -> int:
    return sum(len(list(config.resolve_root(f"sites/{site}/lta").rglob("*.tar")))
               for site in ("cologne", "us"))


def test_a_cursor_a_sensor_cannot_read_is_read_as_cleared_with_a_warning(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        caplog: pytest.LogCaptureFixture) -> None:
    """Each sensor that reads its cursor, ticked from text it cannot read: before, the tick
    raised (int(), json.loads, an unpacking), at every tick until a person cleared it; now
    it asks for what a cleared cursor asks for, and says so in the tick's log."""
    observe(config, opsdb, observations=1, files=1)
    defs = build_definitions(config)
    assert drive(defs, instance).failed == []
    repository = defs.get_repository_def()

    def tick(name: str, cursor: str | None) -> list[str]:
        with build_sensor_context(instance=instance, instance_ref=instance.get_ref(),
                                  cursor=cursor, repository_def=repository,
                                  resources=defs.resources, sensor_name=name) as context:
            log_ticks_in_tree(context, name)
            data = repository.get_sensor_def(name).evaluate_tick(context)
        return sorted(str(r.run_key) for r in data.run_requests or [])

    for name in READ:
        cleared = tick(name, None)
        for text in GARBAGE:
            if name in ("package_sensor", "site_copy_sensor", "lta_copy_sensor",
                        "staging_sensor") and text == "999999999":
                continue  # a position for these (ahead of OpsDB: see the next test)
            if name == "reattempt_sensor" and text.startswith(('{"held"', '{"waiting"')):
                continue  # a JSON object without its entries: never swept, read right
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                assert tick(name, text) == cleared, (name, text)
            said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(f"the cursor {text!r} could not be read" in line for line in said), (
                name, text, said)


def test_a_position_set_ahead_of_opsdb_misses_no_new_work(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """"999999999" as the package and site copy sensors' cursors: every package made after
    it was passed over by them until OpsDB's ids reached it, and waited for the sweep for
    unattended work (policies.unattended_after_s, an hour by default) or forever with it
    off. Now a position past every row is read as a cleared cursor: the next package is
    archived by the next drive, and nothing done is done again."""
    config = deployment(tmp_path / "deploy")
    opsdb = OpsDB(config.opsdb_url)
    try:
        observe_one(config, opsdb, name="obs-0", files=1, size=2000)
        defs = build_definitions(config)
        assert drive(defs, instance).failed == []
        before = lta_tars(config)
        instance.run_storage.set_cursor_values({CURSOR_KEY + name: "999999999" for name in (
            "package_sensor", "site_copy_sensor", "lta_copy_sensor")})

        observe_one(config, opsdb, name="obs-1", files=1, size=2000)
        report = drive(defs, instance)

        assert report.failed == []
        assert lta_tars(config) == before + 2  # the new package at both archive sites
    finally:
        opsdb.dispose()


def test_a_sweep_time_set_in_the_future_does_not_hold_off_the_sweep(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """The re-attempt sensor's cursor with the last sweep for unattended work in the future
    (set by hand): the sweep, the safety net for work every other cursor passed over, was off
    until then. Here a package no sensor asks for (the package sensor's cursor past it) is
    built and archived by the sweep at once (unattended_after_s is tiny)."""
    config = deployment(tmp_path / "deploy", policies={"unattended_after_s": 0.001})
    opsdb = OpsDB(config.opsdb_url)
    try:
        observe_one(config, opsdb, name="obs-0", files=1, size=2000)
        defs = build_definitions(config)
        assert drive(defs, instance).failed == []
        before = lta_tars(config)
        observe_one(config, opsdb, name="obs-1", files=1, size=2000)
        [package] = plan_new_packages(opsdb, config)  # made, then passed over
        with opsdb.session() as session:
            newest = newest_package_id(session)
        instance.run_storage.set_cursor_values({
            CURSOR_KEY + "package_sensor": str(newest),
            CURSOR_KEY + "reattempt_sensor": json.dumps(
                {"next_at": None, "swept_at": 99_999_999_999.0, "swept_to": ""})})

        report = drive(defs, instance)

        assert report.failed == []
        assert lta_tars(config) == before + 2, (package, report.launched)
    finally:
        opsdb.dispose()


def test_a_quarantine_after_an_integrity_cursor_set_ahead_is_reported(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    """The integrity sensor's operation id set past OpsDB's: a copy quarantined since was
    never reported on its partition (the UI's check stayed green while OpsDB said CORRUPT)
    until OpsDB's ids reached it. Now it is, as after a lost cursor."""
    observe(config, opsdb, observations=1, files=1)
    defs = build_definitions(config)
    assert drive(defs, instance).failed == []
    _, cursor = integrity_tick(defs, instance)
    assert cursor is not None
    ahead = {**json.loads(cursor), "op": 999_999_999}
    bad = lta_copies_at(opsdb, "cologne")[0]
    flip_byte(Path(bad.location.root) / bad.relative_path, 100, 0x01)
    assert not reread(opsdb, config, bad.id).passed

    requests, _ = integrity_tick(defs, instance, json.dumps(ahead))

    partition = str(package_site_key(bad.package.name, "cologne"))
    reported = [finding for request in requests for finding in
                request.run_config["ops"]["report_findings"]["config"]["findings"]]
    assert any(f["partition"] == partition and not f["passed"] for f in reported), reported


SENSOR = """query ($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {
  __typename ... on Sensor { sensorState { typeSpecificData {
  ... on SensorData { lastCursor } } } } } }"""
SET_CURSOR = """mutation ($s: SensorSelector!, $c: String) {
  setSensorCursor(sensorSelector: $s, cursor: $c) { __typename } }"""


def test_edit_cursor_in_the_ui_reaches_drive_and_the_ui_shows_drives_cursor(
        config: Config, opsdb: OpsDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"Edit cursor" on a sensor's page writes the sensor's state in the instance, where the
    daemon reads it; `ccat-dt drive` kept its own (CURSOR_KEY) and never read that: the edit
    did nothing under drive, and the page went on showing it, not the drive's cursor. Now
    the drive ticks from the edited cursor (garbage: read as cleared, nothing launched
    twice) and the page shows the drive's. Sent as the UI sends it, through GraphQL."""
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster_graphql.test.utils import execute_dagster_graphql

    from ccat_assets.instance import write_instance_yaml

    repo = Path(__file__).resolve().parent.parent
    observe(config, opsdb, observations=1, files=1)
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    monkeypatch.setenv("PYTHONPATH", str(repo))
    monkeypatch.chdir(repo)
    selector = {"repositoryLocationName": "ccat_assets.definitions:defs",
                "repositoryName": "__repository__", "sensorName": "package_sensor"}
    with DagsterInstance.from_config(str(home)) as dagster, WorkspaceProcessContext(
            dagster, WorkspaceFileTarget(paths=[str(repo / "workspace.yaml")])) as workspace:

        def ui(query: str, **variables: Any) -> Any:
            return execute_dagster_graphql(workspace.create_request_context(), query,
                                           {"s": selector, **variables}).data

        def shown() -> str | None:
            sensor = ui(SENSOR)["sensorOrError"]
            return sensor["sensorState"]["typeSpecificData"]["lastCursor"]  # type: ignore

        defs = build_definitions(config)
        assert drive(defs, dagster).failed == []
        assert ui(SET_CURSOR, c="abc")["setSensorCursor"]["__typename"] == "Sensor"
        lines: list[str] = []
        before = lta_tars(config)

        report = drive(defs, dagster, log=lines.append)

        assert report.failed == [] and report.launched == []  # nothing twice
        assert lta_tars(config) == before
        assert any("the cursor of package_sensor was set in the Dagster UI" in line
                   for line in lines), lines
        newest = dagster.run_storage.get_cursor_values({CURSOR_KEY + "package_sensor"})
        assert shown() == newest[CURSOR_KEY + "package_sensor"] == "2"

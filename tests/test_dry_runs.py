"""The UI's "Test sensor" and "Test schedule" (GraphQL `sensorDryRun`, `scheduleDryRun`):
a dry run evaluates the sensor's code (which may write OpsDB: a package planned, a
re-route) and launches nothing; the real ticks after it must do all the work as if it had
not happened. Then the dialog's "Commit tick result", which stores the evaluated cursor and
nothing else. Sent as the UI sends them, through GraphQL, to the code server the webserver
starts."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from dagster import AssetKey, DagsterInstance, PreviewWarning, build_sensor_context
from sqlalchemy import MetaData, create_engine, select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import CURSOR_KEY, drive
from ccat_assets.partitions import PACKAGES
from ccat_dt.config import Config
from ccat_dt.marker import MARKER, write_marker
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import DataLocation, RawDataPackage, utcnow
from ccat_dt.packages import plan_new_packages
from ccat_dt.staging import Selection, request_staging
from tests.faults.pipeline import archived_everywhere, deployment, observe
from tests.faults.storage_truth import good_archive_sites, lost_filed_files
from tests.helpers import observe as observe_both_modules
from tests.helpers import run_cli
from tests.notify_servers import Receiver
from tests.test_operator_actions import check_status, lta_intact

warnings.filterwarnings("ignore", category=PreviewWarning)

REPO = Path(__file__).resolve().parent.parent
LOCATION = {"repositoryLocationName": "ccat_assets.definitions:defs",
            "repositoryName": "__repository__"}
SENSOR_DRY_RUN = """mutation ($s: SensorSelector!, $c: String) {
  sensorDryRun(selectorData: $s, cursor: $c) { __typename
    ... on DryRunInstigationTick { evaluationResult { cursor skipReason error { message }
      runRequests { runKey } dynamicPartitionsRequests { partitionKeys type } } }
    ... on PythonError { message } } }"""
SCHEDULE_DRY_RUN = """mutation ($s: ScheduleSelector!, $t: Float!) {
  scheduleDryRun(selectorData: $s, timestamp: $t) { __typename
    ... on DryRunInstigationTick { evaluationResult { skipReason error { message }
      runRequests { runKey } } }
    ... on PythonError { message } } }"""
SET_CURSOR = """mutation ($s: SensorSelector!, $c: String) {
  setSensorCursor(sensorSelector: $s, cursor: $c) { __typename } }"""
SENSOR_CURSOR = """query ($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {
  ... on Sensor { sensorState { typeSpecificData { ... on SensorData { lastCursor } } } } } }"""

UI = Callable[..., Any]


@contextmanager
def the_ui(instance: DagsterInstance, config_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[UI]:
    """GraphQL as the webserver answers it, on `instance`, with the code location
    workspace.yaml names (a code server process, as under `make ui`)."""
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster_graphql.test.utils import execute_dagster_graphql

    monkeypatch.setenv("CCAT_DT_CONFIG", str(config_path))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.chdir(REPO)
    with WorkspaceProcessContext(instance, WorkspaceFileTarget(
            paths=[str(REPO / "workspace.yaml")])) as workspace:

        def ui(query: str, **variables: Any) -> Any:
            result = execute_dagster_graphql(workspace.create_request_context(), query,
                                             variables)
            assert not result.errors, result.errors
            return result.data

        yield ui


def dry_run(ui: UI, sensor: str, cursor: str | None) -> dict[str, Any]:
    answer = ui(SENSOR_DRY_RUN, s={**LOCATION, "sensorName": sensor}, c=cursor)["sensorDryRun"]
    assert answer["__typename"] == "DryRunInstigationTick", (sensor, answer)
    result = answer["evaluationResult"]
    assert result["error"] is None, (sensor, cursor, result["error"])
    return dict(result)


def the_instance(instance: DagsterInstance, sensors: list[str]) -> dict[str, Any]:
    """What a dry run must leave as it was: the runs, backfills, partitions and cursors."""
    return {"runs": sorted(r.run_id for r in instance.get_runs()),
            "backfills": [b.backfill_id for b in instance.get_backfills()],
            "partitions": sorted(instance.get_dynamic_partitions(PACKAGES)),
            "cursors": instance.run_storage.get_cursor_values(
                {CURSOR_KEY + name for name in sensors})}


def primary(opsdb: OpsDB, package: str) -> str:
    with opsdb.session() as session:
        row = session.scalar(select(RawDataPackage).where(RawDataPackage.name == package))
        assert row is not None
        return row.primary_site.short_name


def test_test_sensor_and_test_schedule_of_everything_mid_lifecycle_change_no_outcome(
        tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mid-lifecycle (one package archived and purged; cologne's buffer gone, so one package
    waits at the observatory for cologne, its primary, and another at us to be copied to
    cologne; cologne down past the failover horizon; an observation filed, not packaged),
    "Test sensor" of every sensor, with the cursor its page shows and with none, and "Test
    schedule" of the fixity scrub: nothing is launched, no partition or cursor changes. The
    failover sensor's test re-routed the waiting package to us (its code does, as it looks):
    its real ticks then saw nothing to re-route and never asked for the send, which waited
    at the observatory for the sweep for unattended work (an hour by default). Now the next
    drive sends it to us; once cologne is back every package is verified in both LTAs, the
    sources purged, the audit clean and every check green, as without the tests."""
    config = deployment(tmp_path / "deploy", policies={
        "retry_backoff_first_s": 0.5, "retry_backoff_max_hours": 8.0 / 3600,
        "site_failover_hours": 1.0})
    opsdb = OpsDB(config.opsdb_url)
    try:
        defs = build_definitions(config)
        observe(config, opsdb, name="obs-0", files=2, size=20_000)
        assert drive(defs, instance).failed == []
        cologne = config.resolve_root("sites/cologne/buffer")
        (cologne / MARKER).unlink()  # its disk gone
        for name in ("obs-1", "obs-2"):
            observe(config, opsdb, name=name, files=2, size=20_000)
        drive(defs, instance)  # the sends to cologne fail (re-attempted after a back-off)
        with opsdb.session() as session:  # ... down past the failover horizon
            [down] = session.scalars(select(DataLocation).where(
                DataLocation.failing_since.is_not(None))).all()
            down.failing_since = utcnow() - timedelta(hours=2)
        [waiting] = [p for p in ("obs-1_primecam-f280_p00", "obs-2_primecam-f280_p00")
                     if primary(opsdb, p) == "cologne"]
        observe(config, opsdb, name="obs-3", files=2, size=20_000)
        sensors = sorted(s.name for s in defs.get_repository_def().sensor_defs)
        assert len(sensors) == 14
        before = the_instance(instance, sensors)
        shown = {key[len(CURSOR_KEY):]: cursor for key, cursor in before["cursors"].items()}

        with the_ui(instance, config.path, monkeypatch) as ui:
            asked: dict[str, list[str]] = {}
            for name in sensors:
                for cursor in (shown.get(name), None):
                    result = dry_run(ui, name, cursor)
                    asked.setdefault(name, []).extend(
                        r["runKey"] for r in result["runRequests"] or [])
            scrub = ui(SCHEDULE_DRY_RUN, s={**LOCATION, "scheduleName": "fixity_scrub"},
                       t=time.time())["scheduleDryRun"]
            assert scrub["evaluationResult"]["error"] is None, scrub
            assert scrub["evaluationResult"]["runRequests"]  # the scrub has copies to re-read

        assert the_instance(instance, sensors) == before  # nothing launched, added or moved
        assert primary(opsdb, waiting) == "us"  # the failover sensor's test re-routed it
        assert any(key.startswith(f"failover:{waiting}:us") for key in asked["failover_sensor"])

        drive(defs, instance)  # cologne still down: what can be done is done

        observation = waiting.split("_", 1)[0]
        sent = [sites for source, sites in good_archive_sites(config, opsdb).items()
                if f"/{observation}/" in source]
        assert sent and all(sites == {"us/lta"} for sites in sent), sent  # on the storage
        write_marker(cologne)  # cologne is back
        assert drive(defs, instance, wait_s=10).failed == []
        archived_everywhere(config, opsdb)
        assert lost_filed_files(config, opsdb) == []
        lta_intact(opsdb)
        assert run_cli("--config", str(config.path), "audit", "--checksums") == 0
        for asset, check in (("packages", "package_checksum"),
                             ("lta_copies", "lta_copy_checksum"),
                             ("purge_status", "deletion_certificates"),
                             ("purge_status", "filed_bytes_safe")):
            statuses = check_status(instance, asset, check)
            assert statuses and set(statuses.values()) == {"passed"}, (asset, check, statuses)
    finally:
        opsdb.dispose()


def test_commit_tick_result_after_testing_the_overview_sensor_leaves_no_stale_overview(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """"Test sensor" on overview_sensor: the dialog lists no asset events, so the test looks
    like a skip, and the button it offers is "Commit tick result": the cursor (a digest of
    the figures) is stored, the materialization is not. The sensor compared its figures with
    that cursor, so its ticks said "the overview has not changed" and the UI's overview
    stayed at the old figures until they changed again. Now the figures are compared with
    the latest materialization: the next tick shows the new ones."""
    observe_both_modules(config, opsdb, observations=1, files=1)
    defs = build_definitions(config)
    assert drive(defs, instance).failed == []  # its last tick materializes the overview
    observe(config, opsdb, name="obs-1", files=1, size=2000)
    planned = plan_new_packages(opsdb, config)  # a package planned: the figures change
    assert planned
    assert "packages planned" not in overview_figures(instance)

    with the_ui(instance, config.path, monkeypatch) as ui:
        selector = {**LOCATION, "sensorName": "overview_sensor"}
        result = dry_run(ui, "overview_sensor", None)
        assert not result["runRequests"] and not result["dynamicPartitionsRequests"]
        assert ui(SET_CURSOR, s=selector, c=result["cursor"])["setSensorCursor"][
            "__typename"] == "Sensor"  # "Commit tick result"
        committed = ui(SENSOR_CURSOR, s=selector)["sensorOrError"]["sensorState"][
            "typeSpecificData"]["lastCursor"]
    assert committed == result["cursor"]

    repository = defs.get_repository_def()  # the daemon's next tick, from that cursor
    with build_sensor_context(instance=instance, repository_def=repository, cursor=committed,
                              resources=defs.resources) as context:
        tick = repository.get_sensor_def("overview_sensor").evaluate_tick(context)
    for event in tick.asset_events:
        instance.report_runless_asset_event(event)

    assert overview_figures(instance)["packages planned"] == len(planned)


def overview_figures(instance: DagsterInstance) -> dict[str, Any]:
    event = instance.get_latest_materialization_event(AssetKey("operator_overview"))
    assert event is not None and event.asset_materialization is not None
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_a_staging_request_a_stored_test_cursor_passed_over_is_staged_by_the_sweep(
        tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    """"Test sensor" on staging_sensor shows a new request's run and partition; its evaluated
    cursor stored without them (pasted into "Edit cursor": the dialog stores it only with
    "Apply requests") passes over the request, whose partition is never added. The sweep for
    unattended work then asked for its staging run, its partition taken for a package's:
    every tick of the re-attempt sensor failed from then on ("Could not find a partition"),
    no failed work anywhere was re-attempted, and the request was never staged. Now the
    sweep's run brings the request's partition with it and the files are staged."""
    config = deployment(tmp_path / "deploy", policies={"unattended_after_s": 0.001})
    opsdb = OpsDB(config.opsdb_url)
    try:
        written = sorted(p.read_bytes() for p in observe(config, opsdb, name="obs-0",
                                                        files=2, size=2000))
        defs = build_definitions(config)
        assert drive(defs, instance).failed == []
        name = request_staging(opsdb, location="ramses/processing",
                               selection=Selection(observation="obs-0"),
                               expires_in=timedelta(hours=1), requested_by="a scientist")
        cursor = instance.run_storage.get_cursor_values({CURSOR_KEY + "staging_sensor"})
        with the_ui(instance, config.path, monkeypatch) as ui:
            result = dry_run(ui, "staging_sensor", cursor.get(CURSOR_KEY + "staging_sensor"))
            assert [r["runKey"] for r in result["runRequests"]] == [f"stage:{name}"]
            assert ui(SET_CURSOR, s={**LOCATION, "sensorName": "staging_sensor"},
                      c=result["cursor"])["setSensorCursor"]["__typename"] == "Sensor"

        report = drive(defs, instance)

        assert report.sensor_failures == {} and report.failed == []
        staged = config.resolve_root("sites/ramses/processing") / name
        assert sorted(p.read_bytes() for p in staged.rglob("*.dat")) == written
    finally:
        opsdb.dispose()


STOP_SENSOR = """mutation($id: String!) { stopSensor(id: $id) { __typename } }"""
START_SENSOR = """mutation($s: SensorSelector!) {
  startSensor(sensorSelector: $s) { __typename } }"""
SENSOR_ID = """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {
  ... on Sensor { id } } }"""


def opsdb_rows(url: str) -> dict[str, list[str]]:
    """Every row of every OpsDB table, as text."""
    engine = create_engine(url)
    tables = MetaData()
    tables.reflect(engine)
    try:
        with engine.connect() as connection:
            return {table.name: sorted(map(repr, connection.execute(select(table))))
                    for table in tables.sorted_tables}
    finally:
        engine.dispose()


def test_test_sensor_of_a_stopped_sensor_changes_nothing_and_its_hold_stands(
        tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch,
        webhook_receiver: Receiver) -> None:
    """An operator stops failover_sensor (the primary site will be back soon: its packages
    are to wait for it) and notification_sensor, and clicks "Test sensor" on them and on the
    other stopped sensors that write OpsDB at a tick. Before, the tests did what a tick does:
    the waiting package was re-routed to the other archive site (and then sent there by the
    next drive, the failover sensor still stopped), the webhook was posted the site-down
    notice, a finished observation was planned. Now a stopped sensor's test changes no row
    of OpsDB and tells no one; the package waits at the observatory, on the disks."""
    config = deployment(tmp_path / "deploy", policies={"site_failover_hours": 1.0},
                        notifications={"webhook": {"url": webhook_receiver.url,
                                                   "timeout_s": 2}})
    opsdb = OpsDB(config.opsdb_url)
    try:
        observe(config, opsdb, name="obs-0", files=1, size=2000)
        names = sorted(s.name for s in build_definitions(config).get_repository_def()
                       .sensor_defs)
        stopped = ["failover_sensor", "notification_sensor", "package_sensor", "purge_sensor",
                   "reattempt_sensor", "retire_partitions_sensor"]
        assert set(stopped) <= set(names)
        with the_ui(instance, config.path, monkeypatch) as ui:
            for name in stopped:
                sensor = ui(SENSOR_ID, s={**LOCATION, "sensorName": name})["sensorOrError"]["id"]
                assert ui(STOP_SENSOR, id=sensor)["stopSensor"]["__typename"] == \
                    "StopSensorMutationResult"
            before = opsdb_rows(config.opsdb_url)
            dry_run(ui, "package_sensor", None)  # the observation is left unplanned
            assert opsdb_rows(config.opsdb_url) == before
            [package] = plan_new_packages(opsdb, config)  # planned, waiting for its site
            down = primary(opsdb, package)
            other = ({"cologne", "us"} - {down}).pop()
            (config.resolve_root(f"sites/{down}/buffer") / MARKER).unlink()  # its disk gone
            with opsdb.session() as session:  # ... past the failover horizon
                for location in session.scalars(select(DataLocation).where(
                        DataLocation.name == "buffer")):
                    if location.site.short_name == down:
                        location.failing_since = utcnow() - timedelta(hours=2)
            before = opsdb_rows(config.opsdb_url)
            results = {name: dry_run(ui, name, None) for name in stopped}
            assert opsdb_rows(config.opsdb_url) == before
            assert webhook_receiver.posts == []
            told = results["notification_sensor"]["skipReason"]
            assert "nothing sent" in told and f"site_down:{down}" in told, told
            for name in ("package_sensor", "notification_sensor"):
                assert ui(START_SENSOR, s={**LOCATION, "sensorName": name})[
                    "startSensor"]["__typename"] == "Sensor"

        drive(build_definitions(config), instance)  # its sends to `down` fail for now

        assert list(config.resolve_root("sites/ccat/buffer").rglob("*.tar"))  # built
        assert not list(config.resolve_root(f"sites/{other}").rglob("*.tar"))  # not sent
        assert primary(opsdb, package) == down
        assert any(f"site_down:{down}" in str(post) or down in str(post)
                   for post in webhook_receiver.posts)  # told by the running sensor
    finally:
        opsdb.dispose()

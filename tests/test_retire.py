"""Live Dagster partitions stay bounded: finished packages are retired from the `packages`
partitions after the configured age, and OpsDB still answers for them."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, Definitions, build_sensor_context, execute_job
from dagster._core.definitions.assets.job.asset_job import IMPLICIT_ASSET_JOB_NAME
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.storage.tags import PARTITION_NAME_TAG

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import CONFIG_NAME, EMBEDDED_DEFAULT, write_default_config
from ccat_dt.diagnosis import diagnose
from ccat_dt.filing import file_directory, start_observation
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import utcnow
from ccat_dt.topology import prepare_opsdb
from sensors import retire
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import archived_everywhere
from tests.faults.pipeline import observe as observe_one
from tests.helpers import (
    copied_deployment,
    driven_template,
    observe,
    template_directory,
)
from tests.test_dry_runs import LOCATION, the_ui


def deployment_retiring_at_once(tmp_path: Path) -> tuple[Config, OpsDB]:
    """The embedded default, retiring partitions as soon as their package is finished."""
    policies = {**EMBEDDED_DEFAULT["policies"], "retire_partitions_after_days": 0}  # type: ignore[dict-item]
    config = load_config(write_default_config(tmp_path / "deploy",
                                              overrides={"policies": policies}))
    prepare_opsdb(config)
    return config, OpsDB(config.opsdb_url)


@functools.cache
def _retired_template() -> tuple[Path, Path]:
    """`deployment_retiring_at_once` with one observation of one file per module observed,
    filed and driven to the end by the real lifecycle (its partitions retired on the way),
    made once per test process: the set-up of the tests launching runs by hand for a retired
    partition (~4 s of CPU each). Its deployment directory and instance."""
    directory = template_directory("retire-retired")
    config, opsdb = deployment_retiring_at_once(directory)
    observe(config, opsdb, observations=1, files=1)
    return driven_template(config, opsdb)


@pytest.fixture
def retired(tmp_path: Path) -> Iterator[tuple[Config, DagsterInstance]]:
    """What `deployment_retiring_at_once`, `observe(config, opsdb, observations=1, files=1)`
    and a drive of it to the end leave, as a copy of `_retired_template`'s
    (tests.helpers.copied_deployment): the test's own deployment directory and instance."""
    deploy, home = _retired_template()
    with copied_deployment(deploy, home, tmp_path) as instance:
        yield load_config(tmp_path / "deploy" / CONFIG_NAME), instance


def archived_today(tmp_path: Path, instance: DagsterInstance,
                   observations: int) -> tuple[Definitions, list[str]]:
    """The default deployment (partitions retired after 30 days) with its packages driven to
    the end today: its definitions and the live partitions."""
    config = load_config(write_default_config(tmp_path / "deploy"))
    prepare_opsdb(config)
    observe(config, OpsDB(config.opsdb_url), observations=observations, files=1)
    defs = build_definitions(config)
    assert drive(defs, instance).failed == []
    return defs, sorted(instance.get_dynamic_partitions("packages"))


def test_finished_packages_leave_the_partitions_and_stay_in_opsdb(
        tmp_path: Path, instance: DagsterInstance) -> None:  # noqa: F811
    config, opsdb = deployment_retiring_at_once(tmp_path)
    observe(config, opsdb, observations=1, files=1)

    assert drive(build_definitions(config), instance).failed == []

    assert instance.get_dynamic_partitions("packages") == []
    with opsdb.session() as session:
        stages = diagnose(session, config, "obs-0_chai-lfa_p00", utcnow())
    assert [s.state for s in stages] == ["done"] * len(stages)
    assert drive(build_definitions(config), instance).launched == []


def test_a_running_observation_does_not_keep_finished_packages_live(
        tmp_path: Path, instance: DagsterInstance) -> None:  # noqa: F811
    """Files of an observation still being taken belong to no package yet: they must not
    hold back the retirement of packages that are done (a NULL in `NOT IN` once did)."""
    config, opsdb = deployment_retiring_at_once(tmp_path)
    observe(config, opsdb, observations=1, files=1)
    start_observation(opsdb, "obs-running")
    running = config.resolve_root("sites/ccat/instruments") / "obs-running/chai/lfa"
    running.mkdir(parents=True)
    (running / "scan-0.dat").write_bytes(b"still observing")
    file_directory(opsdb, observation="obs-running", module="chai/lfa",
                   directory="obs-running/chai/lfa")

    assert drive(build_definitions(config), instance).failed == []

    assert instance.get_dynamic_partitions("packages") == []
    assert (running / "scan-0.dat").read_bytes() == b"still observing"  # not packaged, kept


def test_the_retire_sensor_works_through_a_backlog_batch_by_batch(
        tmp_path: Path, instance: DagsterInstance,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Partitions of packages that became old enough all at once (after an upgrade, or a
    policy change) drain over ticks: each tick examines the batch of live partitions after
    the last one it examined, wrapping around to those not finished before."""
    defs, live = archived_today(tmp_path, instance, observations=2)
    assert len(live) == 4  # done, but archived today

    monkeypatch.setattr(retire, "BATCH", 3)
    monkeypatch.setattr(retire, "utcnow", lambda: utcnow() + timedelta(days=31))
    cursor, retired_per_tick = None, []
    for _ in range(3):
        with build_sensor_context(instance=instance, cursor=cursor,
                                  resources={"deployment": (defs.resources or {})["deployment"]}
                                  ) as context:
            tick = retire.retire_partitions_sensor.evaluate_tick(context)
        keys = [key for request in tick.dynamic_partitions_requests or []
                for key in request.partition_keys or []]
        for key in keys:
            instance.delete_dynamic_partition("packages", key)
        retired_per_tick.append(keys)
        cursor = tick.cursor

    assert retired_per_tick == [live[:3], live[3:], []]
    assert instance.get_dynamic_partitions("packages") == []


def test_a_package_with_a_run_in_flight_keeps_its_partition(
        tmp_path: Path, instance: DagsterInstance,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A package's purge has deleted what it may and recorded so, but its run is still storing
    its output: retiring the partition then failed that run (a partition gone mid-run). A
    partition with a run queued or running (the purge's, the UI's, a backfill's) stays until
    that run ended."""
    defs, live = archived_today(tmp_path, instance, observations=1)
    busy = live[0]
    job = defs.resolve_implicit_global_asset_job_def()
    run = instance.create_run_for_job(job, tags={PARTITION_NAME_TAG: busy},
                                      asset_selection=frozenset({AssetKey("purge_status")}))
    monkeypatch.setattr(retire, "utcnow", lambda: utcnow() + timedelta(days=31))

    def retired() -> list[str]:
        with build_sensor_context(instance=instance, resources={
                "deployment": (defs.resources or {})["deployment"]}) as context:
            tick = retire.retire_partitions_sensor.evaluate_tick(context)
        return sorted(key for request in tick.dynamic_partitions_requests or []
                      for key in request.partition_keys or [])

    assert retired() == live[1:]
    instance.report_run_failed(run)  # the run ended
    assert retired() == live


def _launched_by_hand(instance: DagsterInstance, asset: str, key: str) -> str:
    """A run of `asset` for partition `key` as the daemon executes what the UI's Re-execute
    or the GraphQL API launched (no partition check before it starts, unlike `dagster asset
    materialize`): "" when it succeeded, else what its event log says of the failure."""
    job = ReconstructableRepository.for_module(
        "ccat_assets.definitions", "defs").get_reconstructable_job(IMPLICIT_ASSET_JOB_NAME)
    with execute_job(job, instance, asset_selection=[AssetKey(asset)], raise_on_error=False,
                     tags={PARTITION_NAME_TAG: key}) as result:
        if result.success:
            return ""
        return "\n".join(f"{record.message} {record.dagster_event.event_specific_data}"
                         for record in instance.all_logs(result.run_id)
                         if record.dagster_event and record.dagster_event.is_failure)


@pytest.mark.parametrize("asset", ["packages", "site_copies", "lta_copies", "purge_status"])
def test_a_run_launched_by_hand_for_a_retired_partition_brings_it_back(
        retired: tuple[Config, DagsterInstance],
        monkeypatch: pytest.MonkeyPatch, asset: str) -> None:
    """A package archived long ago, its partition retired, and an operator re-executes one of
    its old runs: every asset with an upstream failed with Dagster's internal "Partition
    range X to X is not a valid range" before its code ran (found by a helper). The partition
    comes back for the run, as for the sensors' runs; a package OpsDB does not know fails
    the run saying so."""
    config, instance = retired  # observed, filed, driven to the end
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    assert instance.get_dynamic_partitions("packages") == []  # retired
    name = "obs-0_chai-lfa_p00"

    key = name if asset in ("packages", "purge_status") else f"{name}|us"
    assert _launched_by_hand(instance, asset, key) == ""
    assert instance.get_dynamic_partitions("packages") == [name]

    failure = _launched_by_hand(instance, asset, key.replace(name, "obs-9_unknown_p00"))
    assert "unknown package 'obs-9_unknown_p00'" in failure, failure
    assert instance.get_dynamic_partitions("packages") == [name]


ADD_PARTITION = """mutation($r: RepositorySelector!, $n: String!, $k: String!) {
  addDynamicPartition(repositorySelector: $r, partitionsDefName: $n, partitionKey: $k) {
    __typename } }"""


def test_a_partition_added_by_hand_for_no_package_is_retired_saying_so(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The UI's "Add partition" on `packages` and on `staging_requests` with names OpsDB has
    no package or staging request of (a typo). Before, they stayed in the UI for ever as a
    package and a request never materialized (and "Materialize all missing" failed a run for
    each). Now the retire sensor retires them and says so; no run is launched for them, and
    the real package is archived and purged as ever."""
    observe_one(config, opsdb, files=1, size=20_000)
    with the_ui(instance, config.path, monkeypatch) as ui:
        for dimension, key in (("packages", "obs-9_typo_p00"), ("staging_requests", "typo")):
            answer = ui(ADD_PARTITION, r=LOCATION, n=dimension, k=key)["addDynamicPartition"]
            assert answer["__typename"] == "AddDynamicPartitionSuccess", answer

    with caplog.at_level(logging.WARNING, logger="ccat_assets.ticks.retire_partitions_sensor"):
        report = drive(build_definitions(config), instance, wait_s=10)

    assert report.failed == [] and not [key for key in report.launched if "typo" in key]
    assert instance.get_dynamic_partitions("packages") == ["obs-0_primecam-f280_p00"]
    assert instance.get_dynamic_partitions("staging_requests") == []
    assert "1 partition(s) naming no package in OpsDB retired (added by hand in the UI, or " \
           "OpsDB restored from an older backup): obs-9_typo_p00" in caplog.text
    assert "naming no staging request in OpsDB retired" in caplog.text
    archived_everywhere(config, opsdb)  # in OpsDB, and on the disks:
    assert_safe(config, opsdb)


DELETE_PARTITIONS = """mutation($r: RepositorySelector!, $n: String!, $k: [String!]!, $w: Boolean) {
  deleteDynamicPartitions(repositorySelector: $r, partitionsDefName: $n, partitionKeys: $k,
                          wipeMaterializations: $w) {
    __typename ... on UnsupportedOperationError { message } } }"""
SENSOR_ID = """query($s: SensorSelector!) {
  sensorOrError(sensorSelector: $s) { ... on Sensor { id } } }"""
STOP_SENSOR = """mutation($id: String!) { stopSensor(id: $id) { __typename } }"""
START_SENSOR = """mutation($s: SensorSelector!) {
  startSensor(sensorSelector: $s) { __typename } }"""


def test_a_partition_deleted_in_the_ui_before_its_purge_comes_back_with_the_purge(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """"Delete partition" in the UI of a package archived at both sites whose sources wait
    for the purge (its sensor stopped): with "wipe materializations" it is refused, saying so,
    and nothing changes; without, the partition goes, `why` still says the purge is due, and
    once the purge sensor runs again the sources are purged as ever and the partition is back
    with its history (the purge sensor asks for the partition with its run)."""
    observe_one(config, opsdb, files=1, size=20_000)
    name = "obs-0_primecam-f280_p00"
    source = sorted(config.resolve_root("sites/ccat/instruments").rglob("*.dat"))
    purge = {**LOCATION, "sensorName": "purge_sensor"}
    with the_ui(instance, config.path, monkeypatch) as ui:
        sensor = ui(SENSOR_ID, s=purge)["sensorOrError"]["id"]
        assert ui(STOP_SENSOR, id=sensor)["stopSensor"]["__typename"] == \
            "StopSensorMutationResult"
        assert drive(build_definitions(config), instance).failed == []
        assert all(path.exists() for path in source)  # archived, kept: the purge is held

        refused = ui(DELETE_PARTITIONS, r=LOCATION, n="packages", k=[name], w=True)
        assert "The partitions were not deleted" in \
            refused["deleteDynamicPartitions"]["message"], refused
        assert instance.get_dynamic_partitions("packages") == [name]
        deleted = ui(DELETE_PARTITIONS, r=LOCATION, n="packages", k=[name], w=False)
        assert deleted["deleteDynamicPartitions"]["__typename"] == \
            "DeleteDynamicPartitionsSuccess"
        assert instance.get_dynamic_partitions("packages") == []
        with opsdb.session() as session:
            [purged] = [s for s in diagnose(session, config, name, utcnow()) if s.stage == "purge"]
        assert purged.state == "waiting", purged

        assert ui(START_SENSOR, s=purge)["startSensor"]["__typename"] == "Sensor"
        report = drive(build_definitions(config), instance)

    assert report.failed == [] and [key for key in report.launched if key.startswith("purge:")]
    assert not any(path.exists() for path in source)  # on the disk
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
    assert instance.get_dynamic_partitions("packages") == [name]
    for asset in ("packages", "site_copies", "lta_copies", "purge_status"):
        assert instance.get_materialized_partitions(AssetKey(asset)), asset

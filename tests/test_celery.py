"""Production mode on this machine: Dagster storage in PostgreSQL, the OpsDB in PostgreSQL,
steps executed by one Celery worker per site (Redis broker), each serving only its site's
queues. The same lifecycle as the embedded test; OpsDB shows each step ran at its site."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
)
from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository
from dagster._core.execution.api import create_execution_plan, execute_run
from dagster._core.remote_origin import RemoteJobOrigin
from dagster._core.snap import snapshot_from_execution_plan
from dagster._core.storage.tags import PARTITION_NAME_TAG
from sqlalchemy import select

from ccat_assets import celery_watch
from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_assets.partitions import package_site_key
from ccat_assets.tags import QUEUE_TAG
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import EMBEDDED_DEFAULT, write_default_config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import DataLocation, Operation, OperationType, Site
from ccat_dt.packages import plan_packages
from ccat_dt.queues import packaging_queue, transfer_queue
from ccat_dt.storage import files_under
from ccat_dt.topology import prepare_opsdb
from tests.helpers import observe
from tests.test_routing import partition_tags

# Each test has its own Redis (tests.services.redis_server); the Celery suites still run one at
# a time (pytest -n, loadgroup): a test's three workers and its drive keep both cores busy.
pytestmark = pytest.mark.xdist_group("redis")

REPO = Path(__file__).resolve().parents[1]
BY_HAND_S = 120.0  # a run by hand ends within this (seconds on an idle machine)
T = TypeVar("T")


def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runs (forked from this process by the drive) ask Celery whether a step is done
    every 0.1 s instead of every second: dagster-celery's pace, which is nothing beside a
    transfer but most of these small runs' time (each of its steps waits for one poll)."""
    from dagster_celery import core_execution_loop

    monkeypatch.setattr(core_execution_loop, "TICK_SECONDS", 0.1)


def production(tmp_path: Path, postgres_url: str, dagster_url: str, broker: str,
               **policies: float) -> Config:
    """The embedded default on PostgreSQL (OpsDB and Dagster's storage) with Celery over
    `broker`; `policies` override the default's."""
    overrides: dict[str, object] = {"opsdb_url": postgres_url,
                                    "execution": {"celery_broker": broker}}
    if policies:
        overrides["policies"] = {**EMBEDDED_DEFAULT["policies"], **policies}  # type: ignore[dict-item]
    config = load_config(write_default_config(tmp_path / "deploy", overrides=overrides))
    prepare_opsdb(config)
    home = tmp_path / "deploy" / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "telemetry": {"enabled": False},
        "storage": {"postgres": {"postgres_url": dagster_url}}}))
    return config


def start_worker(config: Config, site: str, home: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "ccat_assets.cli", "--config", str(config.path), "worker",
         "--site", site, "--concurrency", "1", "--loglevel", "WARNING"],
        cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)


def test_lifecycle_on_postgres_with_a_celery_worker_per_site(
        tmp_path: Path, postgres_url: str, dagster_database: str, redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    quick_polls(monkeypatch)
    # Every queue is served here: no step may be taken for unserved (a step waiting behind
    # another in its worker's queue included), and a check run sent to no site's queue fails
    # soon instead of at the deployment's bound.
    monkeypatch.setattr(celery_watch, "UNSERVED_FOR_S", 30.0)
    config = production(tmp_path, postgres_url, dagster_database, redis_url)
    home = config.directory / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    opsdb = OpsDB(config.opsdb_url)
    source = observe(config, opsdb, observations=1, files=1)
    workers = {site: start_worker(config, site, home, tmp_path / f"worker-{site}.log")
               for site in ("ccat", "cologne", "us")}
    try:
        time.sleep(3)  # let the workers connect to the broker before work is queued
        assert all(w.poll() is None for w in workers.values()), "a worker died at start"
        with DagsterInstance.get() as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            checked_by_hand(config, opsdb, instance, *copied_by_hand(config, opsdb, instance))
            report = drive(build_definitions(config), instance)
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                os.killpg(worker.pid, 15)
        for worker in workers.values():
            worker.wait(timeout=30)
    logs = {site: (tmp_path / f"worker-{site}.log").read_text() for site in workers}
    assert report.failed == [], logs
    assert files_under(source) == []  # the lifecycle completed

    with opsdb.session() as session:
        rows = session.execute(
            select(Operation.operation_type, Operation.worker, Site.short_name)
            .join(DataLocation, Operation.destination_location_id == DataLocation.id)
            .join(Site, DataLocation.site_id == Site.id)).all()
        deletions = session.execute(
            select(Operation.worker, Site.short_name)
            .join(DataLocation, Operation.source_location_id == DataLocation.id)
            .join(Site, DataLocation.site_id == Site.id)
            .where(Operation.operation_type == OperationType.DELETION)).all()
    placed = [(kind, worker, site) for kind, worker, site in rows
              if kind in (OperationType.PACKAGING, OperationType.TRANSFER, OperationType.ARCHIVE)]
    assert {kind for kind, _, _ in placed} == {OperationType.PACKAGING, OperationType.TRANSFER,
                                               OperationType.ARCHIVE}
    assert all(worker == site for _, worker, site in placed), placed  # ran where the data lands
    assert deletions and all(worker == site for worker, site in deletions), deletions
    opsdb.dispose()


def copied_by_hand(config: Config, opsdb: OpsDB, instance: DagsterInstance) -> tuple[str, str]:
    """A package built and copied to its site by `dagster asset materialize` (as the UI's
    Materialize, with no queue or broker in the run config: the executor routes the run).
    Each step executes in its site's worker and the copy lands there (read from the storage).
    Before, such runs failed before a step ("'dict_wrapper' object is not a mapping"), then
    waited for ever on the rpc:// result backend the workers never store in."""
    with opsdb.session() as session:
        planned = plan_packages(session, config)
        package, site = planned[0].name, planned[0].primary_site.short_name
    instance.add_dynamic_partitions("packages", [p.name for p in planned])
    for asset, partition in (("packages", package),
                             ("site_copies", str(package_site_key(package, site)))):
        try:
            done = subprocess.run(
                [sys.executable, "-m", "dagster", "asset", "materialize", "-m",
                 "ccat_assets.definitions", "--select", asset, "--partition", partition],
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                text=True, timeout=BY_HAND_S, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{asset} {partition}: the run had not ended after {BY_HAND_S:.0f} s")
        assert done.returncode == 0, (asset, done.stderr[-3000:])
    [run, _] = instance.get_runs()
    assert run.tags.get(QUEUE_TAG) == transfer_queue(config, site)
    built = list(config.resolve_root("sites/ccat/buffer").rglob("*.tar"))
    copied = list(config.resolve_root(f"sites/{site}/buffer").rglob("*.tar"))
    assert len(built) == 1 and [p.name for p in copied] == [built[0].name], (built, copied)
    assert hash_file(copied[0]) == hash_file(built[0])
    return package, site


def ended(execute: Callable[[], T], what: str) -> T:
    """`execute()`'s result, failing the test if it has not returned within BY_HAND_S (the
    run would otherwise wait for ever); the run is left to the test's end."""
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(execute()), daemon=True)
    thread.start()
    thread.join(BY_HAND_S)
    if not out:
        pytest.fail(f"{what}: the run had not ended after {BY_HAND_S:.0f} s")
    return out[0]


def run_by_ui(instance: DagsterInstance, tags: dict[str, str],
              assets: frozenset[AssetKey] | None = None,
              checks: frozenset[AssetCheckKey] | None = None) -> DagsterRun:
    """A run of the asset job as the webserver creates it (ui_run) and executes it (the run
    worker's execute_run)."""
    recon, run = ui_run(instance, tags, assets, checks)
    ended(lambda: execute_run(recon, run, instance), f"run {run.run_id}")
    done = instance.get_run_by_id(run.run_id)
    assert done is not None
    return done


def ui_run(instance: DagsterInstance, tags: dict[str, str],
           assets: frozenset[AssetKey] | None = None,
           checks: frozenset[AssetCheckKey] | None = None, origin: RemoteJobOrigin | None = None
           ) -> tuple[ReconstructableJob, DagsterRun]:
    """A run of the asset job as the webserver creates it (dagster-graphql's
    create_valid_pipeline_run: no execution config; for the Checks tab's "Execute" the checks
    and no asset), not started; with its reconstructable job. `origin`: the code location's
    job origin, which a run to be queued needs (its dequeue launches it from there)."""
    recon = ReconstructableRepository.for_module(
        "ccat_assets.definitions", "defs").get_reconstructable_job("__ASSET_JOB").get_subset(
        asset_selection=set(assets or ()), asset_check_selection=checks)
    job = recon.get_definition()
    plan = create_execution_plan(recon, tags=tags, instance_ref=instance.get_ref())
    run = instance.create_run(
        job_name=job.name, run_id=None, run_config=None, status=DagsterRunStatus.NOT_STARTED,
        tags=tags, root_run_id=None, parent_run_id=None,
        step_keys_to_execute=plan.step_keys_to_execute,
        execution_plan_snapshot=snapshot_from_execution_plan(plan, job.get_job_snapshot_id()),
        job_snapshot=job.get_job_snapshot(), parent_job_snapshot=job.get_parent_job_snapshot(),
        asset_selection=assets, asset_check_selection=checks, resolved_op_selection=None,
        op_selection=None, remote_job_origin=origin, job_code_origin=recon.get_python_origin(),
        asset_graph=job.asset_layer.asset_graph)
    return recon, run


def checked_by_hand(config: Config, opsdb: OpsDB, instance: DagsterInstance, package: str,
                    site: str) -> None:
    """The Checks tab's "Execute" on the site copy's partition: the run is routed to the
    site's transfer queue, and the check re-reads the copy in that site's worker (OpsDB
    records who read). Before, the run had no stage and no queue: its step went to Celery's
    default queue, which no worker serves, and the run stayed STARTED for ever."""
    key = AssetCheckKey(AssetKey("site_copies"), "site_copy_checksum")
    run = run_by_ui(instance, partition_tags(package, site), checks=frozenset({key}))
    assert run.status == DagsterRunStatus.SUCCESS, failure_of(instance, run)
    assert run.tags.get(QUEUE_TAG) == transfer_queue(config, site)
    [evaluation] = [r.dagster_event.event_specific_data for r in instance.all_logs(
        run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION) if r.dagster_event]
    assert isinstance(evaluation, AssetCheckEvaluation) and evaluation.passed, evaluation
    assert evaluation.metadata["verified_by"].value == "re-read"
    with opsdb.session() as session:
        read = session.get_one(Operation, evaluation.metadata["operation_id"].value)
        assert (read.operation_type, read.worker) == (OperationType.VERIFICATION, site)


def failure_of(instance: DagsterInstance, run: DagsterRun) -> str:
    """Why the run failed, as its page says."""
    return "\n".join(str(getattr(r.dagster_event.event_specific_data, "error", None) or r.message)
                     for r in instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_FAILURE)
                     if r.dagster_event)


def test_a_run_on_a_queue_no_worker_serves_fails_naming_the_worker_to_start(
        tmp_path: Path, postgres_url: str, dagster_database: str, redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A package's build launched from the UI with the observatory's worker not started (only
    another site's runs): its step waits in the packaging queue, which no live worker
    consumes. Before, the run stayed STARTED for ever, nobody told; now it fails once nobody
    has served the queue for UNSERVED_FOR_S (shortened here), naming the queue and the worker
    to start, its step never started."""
    quick_polls(monkeypatch)
    monkeypatch.setattr(celery_watch, "WATCH_EVERY_S", 0.5)
    monkeypatch.setattr(celery_watch, "UNSERVED_FOR_S", 2.0)
    config = production(tmp_path, postgres_url, dagster_database, redis_url)
    home = config.directory / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    worker = start_worker(config, "us", home, tmp_path / "worker-us.log")
    try:
        time.sleep(3)  # let the worker connect to the broker
        assert worker.poll() is None, "the worker died at start"
        with DagsterInstance.get() as instance:
            instance.add_dynamic_partitions("packages", ["obs-0001_primecam-f280_p00"])
            run = run_by_ui(instance, {PARTITION_NAME_TAG: "obs-0001_primecam-f280_p00"},
                            assets=frozenset({AssetKey("packages")}))
            why = failure_of(instance, run)
            started = instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START)
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=30)
    assert run.status == DagsterRunStatus.FAILURE
    assert f'no live Celery worker has served queue "{packaging_queue(config)}"' in why, why
    assert "start `ccat-dt worker --site ccat`" in why, why
    assert started == []


def test_an_unserved_step_a_worker_marked_revoked_fails_with_why(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The look that finds a step's queue unserved revokes it, and a worker that hears the
    revoke marks the step REVOKED (Celery 5.7 marks a task it has not started): the step must
    still fail with why (the queue, the worker to start), not as revoked by the run, which
    dagster-celery took for "steps {...} in an unknown state" (the test above failed so, most
    times, its worker quicker than the run)."""
    from celery import Celery
    from celery.exceptions import TaskRevokedError

    monkeypatch.setattr(celery_watch, "WATCH_EVERY_S", 0.0)
    monkeypatch.setattr(celery_watch, "UNSERVED_FOR_S", 0.0)
    app = Celery(broker=redis_url, backend=redis_url)
    sent = app.send_task("probe", queue="ccat_buffer_packaging")
    watched = celery_watch.WatchedResult(app, sent, queue="ccat_buffer_packaging",
                                         sites={"ccat_buffer_packaging": "ccat"})
    assert watched.ready()  # no worker serves its queue: taken for lost, and revoked
    app.backend.mark_as_revoked(sent.id, reason="revoked")  # as a worker hearing it does
    with pytest.raises(celery_watch.StepLost, match="start `ccat-dt worker --site ccat`"):
        try:
            watched.get()
        except TaskRevokedError as exc:
            raise AssertionError("the step read as revoked by the run") from exc

"""The Celery broker loses what it held (Redis restarted empty, failed over to a replica that
lacked it, flushed), or is down for a few seconds with its data kept, while a deployment runs
on dagster-celery, under the production executor (PostgreSQL storage and OpsDB, one real
worker per site). Its own Redis server per test (keeping nothing on disk, unless the test
keeps its data), so that it can be restarted without touching the shared one.

A step whose message was queued, or whose result was written, when Redis lost its data reads
PENDING for ever: no worker was recorded for it, so nothing asks after it. The run that waits
for it must end (failed) and the work be asked for again with nobody involved
(ccat_assets/celery_watch.py); nothing may be done twice, nothing left half-written. (A
finished step's result lost the same way reads PENDING too and is caught by the same look;
it was checked once by hand, by a worker flushing Redis right after storing its first result,
and is not repeated here: each case takes over a minute.)"""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, EventLogEntry, RunsFilter
from sqlalchemy import func, select

from ccat_assets import celery_watch
from ccat_dt.config import Config
from ccat_dt.notify import current_problems
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import Operation, OperationStatus, OperationType
from ccat_dt.queues import packaging_queue
from ccat_dt.storage import files_under
from tests.faults.invariants import assert_safe
from tests.faults.storage_truth import lost_filed_files
from tests.helpers import observe
from tests.services import RedisServer, free_port
from tests.test_celery import production
from tests.test_celery_worker_killed import SITES, Workers, finish, part_files, start_drive

pytestmark = pytest.mark.xdist_group("redis")

REPO = Path(__file__).resolve().parents[1]
DRIVE_TIMEOUT_S = 150.0

@pytest.fixture
def deployment(tmp_path: Path, postgres_url: str, dagster_database: str,
               redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
               ) -> Iterator[tuple[Config, OpsDB, RedisServer]]:
    config = production(tmp_path, postgres_url, dagster_database, redis_server.url,
                        retry_backoff_first_s=1.0)
    monkeypatch.setenv("DAGSTER_HOME", str(config.directory / "dagster_home"))
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    opsdb = OpsDB(config.opsdb_url)
    yield config, opsdb, redis_server
    opsdb.dispose()


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               *procs: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s"
        assert all(p.poll() is None for p in procs), f"a process ended before {what}"
        time.sleep(0.1)


def queued(server: RedisServer, queue: str) -> bool:
    client = server.client()
    return any(client.type(key) == b"list" and client.llen(key)  # type: ignore[attr-defined]
               for key in client.keys(f"{queue}*"))  # type: ignore[attr-defined]


def settle(config: Config, opsdb: OpsDB, tmp_path: Path, drive: subprocess.Popen[bytes],
           what: str) -> None:
    """`drive` must end (no run left STARTED); a second drive finishes what it left for a
    later back-off."""
    code = finish(drive, DRIVE_TIMEOUT_S)
    with DagsterInstance.get() as instance:
        started = [r.run_id for r in instance.get_runs(
            RunsFilter(statuses=[DagsterRunStatus.STARTED]))]
    with opsdb.session() as session:
        problems = current_problems(session, config, datetime.now(UTC))
        claims = session.scalars(select(Operation.id).where(
            Operation.status == OperationStatus.IN_PROGRESS)).all()
    if code is None:
        pytest.fail(f"{what}: `ccat-dt drive` had not ended after {DRIVE_TIMEOUT_S:.0f} s: "
                    f"runs still STARTED {started}, operations IN_PROGRESS {claims}, "
                    f"problems told to a person: {[p.subject for p in problems]}")
    assert started == []
    assert finish(start_drive(config, tmp_path, "drive-2"), DRIVE_TIMEOUT_S) is not None


def assert_done_once(config: Config, opsdb: OpsDB, source: Path, logs: str) -> None:
    assert files_under(source) == [], logs  # the lifecycle completed
    assert part_files(config) == []
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
    with opsdb.session() as session:  # no package built twice, none sent out twice
        twice = session.execute(
            select(Operation.operation_type, Operation.package_id,
                   Operation.destination_location_id, func.count())
            .where(Operation.status == OperationStatus.COMPLETED,
                   Operation.operation_type.in_([OperationType.PACKAGING,
                                                 OperationType.TRANSFER]))
            .group_by(Operation.operation_type, Operation.package_id,
                      Operation.destination_location_id)
            .having(func.count() > 1)).all()
    assert twice == [], twice


def test_a_queued_step_lost_when_redis_restarts_empty(
        deployment: tuple[Config, OpsDB, RedisServer], tmp_path: Path) -> None:
    """The packaging step's message waits in the broker (the observatory's worker not up
    yet) when Redis restarts empty; the other sites' workers reconnect (they do the copies),
    the observatory's starts after. The run that sent the step must not wait for it for
    ever."""
    config, opsdb, server = deployment
    source = observe(config, opsdb, observations=1, files=1)
    workers = Workers(config, tmp_path)
    for site in ("cologne", "us"):
        workers.start(site)
    try:
        time.sleep(3)
        drive = start_drive(config, tmp_path, "drive-1")
        wait_until(lambda: queued(server, packaging_queue(config)), 120,
                   "the packaging step queued", drive, *workers.procs.values())
        # The restart between two of the run's polls (a poll that meets the broker down fails
        # the run at once, which heals: not what is tested here).
        os.killpg(drive.pid, signal.SIGSTOP)
        try:
            server.restart()
        finally:
            os.killpg(drive.pid, signal.SIGCONT)
        workers.start("ccat")
        settle(config, opsdb, tmp_path, drive, "a queued step lost with Redis")
    finally:
        workers.stop()
    assert_done_once(config, opsdb, source, workers.logs())


OUTAGE_S = 6.0  # Redis down: more than a few of the run's looks at its step (1 s apart)
HOLD_S = OUTAGE_S / 2  # the step goes on at its worker and ends in the middle of the outage


@pytest.mark.parametrize("redis_server", ["keep"], indirect=True)
def test_a_step_rides_out_a_short_redis_outage(
        deployment: tuple[Config, OpsDB, RedisServer], tmp_path: Path) -> None:
    """Redis, the broker and result backend, is down for a few seconds (killed, restarted
    with its data) while a transfer step goes on at its worker and its run waits for it; the
    step ends in the middle of the outage. The worker stores the step's result once Redis is
    back and the run, having waited for it, reads it: no run fails (before: the run's next
    look failed it, "ConnectionError: ... Connection refused", and the step's result, stored
    while Redis was down, was a ConnectionError too), nothing is done twice. (Redis stopped
    instead, SIGSTOP, its connections hang: the run's look waits, up to Celery's 120 s socket
    time-out, and nothing failed before either; checked by hand, not repeated here.)"""
    config, opsdb, server = deployment
    source = observe(config, opsdb, observations=1, files=1)
    workers = Workers(config, tmp_path)
    marker = tmp_path / "held"
    for site in SITES:
        workers.start(site, "mid-write" if site == "cologne" else None, marker, HOLD_S)
    try:
        time.sleep(3)
        drive = start_drive(config, tmp_path, "drive-1")
        wait_until(marker.exists, 120, "the transfer step held", drive,
                   *workers.procs.values())
        server.down_for(OUTAGE_S)
        settle(config, opsdb, tmp_path, drive, f"Redis down for {OUTAGE_S:.0f} s")
    finally:
        workers.stop()
    assert_done_once(config, opsdb, source, workers.logs())
    failed = failed_runs()
    assert failed == [], "\n".join(failed)


def test_redis_unreachable_longer_fails_the_run_naming_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past BROKER_OUTAGE_S the wait ends: the run fails, as it did at once before, with the
    broker named."""
    from celery import Celery

    monkeypatch.setattr(celery_watch, "BROKER_OUTAGE_S", 0.5)
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app = Celery(broker=url, backend=url)
    watched = celery_watch.WatchedResult(app, app.AsyncResult("a-step"))
    assert watched.ready() is False  # not known yet
    time.sleep(0.6)
    with pytest.raises(celery_watch.BrokerUnreachable,
                       match=rf"result backend {url}\) has not answered for \d+ s"):
        watched.ready()


def failed_runs() -> list[str]:
    """Each failed run's job and error."""
    with DagsterInstance.get() as instance:
        return [f"{run.job_name}: {_error(event)}"
                for run in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.FAILURE]))
                for event in instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_FAILURE)]


def _error(event: EventLogEntry) -> str:
    error = getattr(getattr(event.dagster_event, "event_specific_data", None), "error", None)
    return error.message.strip() if error is not None else event.message


def test_a_step_sent_while_redis_is_down_is_sent_and_marked_once_it_is_back(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """A run sends a step (another package's copy, its next stage) in the middle of a Redis
    outage. Before, Celery's three tries in 0.6 s failed the run ("OperationalError: Error
    111 ... Connection refused"), and the mark write after it would have too: the message is
    in Redis, and the step's mark, once Redis is back."""
    from dagster import DagsterInstance as Instance
    from dagster._core.definitions.job_base import InMemoryJob
    from dagster._core.executor.init import InitExecutorContext
    from dagster_celery.make_app import make_app

    from ccat_assets.definitions import build_definitions
    from ccat_assets.routing import routed_celery_executor
    from ccat_assets.stages import JOBS
    from ccat_dt.config import load_config
    from ccat_dt.defaults import write_default_config
    from ccat_dt.stages import Stage

    config = load_config(write_default_config(
        tmp_path / "deploy", overrides={"execution": {"celery_broker": redis_server.url}}))
    definition = routed_celery_executor(config)
    with Instance.ephemeral() as instance:
        executor: Any = definition.executor_creation_fn(InitExecutorContext(  # type: ignore[misc]
            job=InMemoryJob(build_definitions(config).resolve_job_def(JOBS[Stage.SITE_COPY].name)),
            executor_def=definition,
            executor_config={"retries": {"enabled": {}}}, instance=instance))
    app = make_app(executor.app_args())  # as dagster-celery's run loop makes it
    queue = "ccat-dt.probe"
    app.send_task("probe", queue=queue, routing_key=f"{queue}.execute_plan")  # connected
    redis_server.client().delete(queue)  # type: ignore[attr-defined]
    redis_server.stop()
    back = threading.Timer(3.0, redis_server.start)
    back.start()
    try:
        sent = app.send_task("probe", queue=queue, routing_key=f"{queue}.execute_plan")
    finally:
        back.join()
    assert queued(redis_server, queue)
    redis_server.stop()
    back = threading.Timer(3.0, redis_server.start)
    back.start()
    try:
        celery_watch.mark_sent(celery_watch._stores(app), sent.id)  # noqa: SLF001
    finally:
        back.join()
    assert redis_server.client().get(celery_watch.SENT.format(sent.id)) == b"1"  # type: ignore[attr-defined]
    del sent  # its result's subscription ended while Redis is up
    gc.collect()


def test_a_terminate_sent_while_redis_is_down_is_broadcast_once_it_is_back(
        redis_server: RedisServer) -> None:
    """An operator's Terminate in the middle of a Redis outage: the revoke that stops the
    step at its worker (a broadcast through Redis) is sent once Redis is back, however long
    kombu's own tries took to give up. Before, they gave up after some 4 s: the run failed
    with kombu's "OperationalError: Error 111 ... Connection refused" and no revoke was sent,
    its step going on at its worker to its end (a transfer of hours)."""
    import redis
    from celery import Celery

    app = Celery(broker=redis_server.url, backend=redis_server.url)
    watched = celery_watch.WatchedResult(app, app.AsyncResult("a-step"))
    app.control.inspect(timeout=0.5).active()  # the run's looks at the step's worker: one
    redis_server.stop()
    with pytest.raises(redis.ConnectionError):  # and one in the outage (a look that proves nothing)
        app.control.inspect(timeout=0.5).active()

    class BackOnRetry(logging.Handler):
        """Redis starts again once the run says it tries the revoke again: kombu's own tries
        have all failed by then."""

        def emit(self, record: logging.LogRecord) -> None:
            if "revoke" in record.getMessage() and redis_server.proc is not None and (
                    redis_server.proc.poll() is not None):
                redis_server.start()

    handler = BackOnRetry(logging.WARNING)
    celery_watch.LOG.addHandler(handler)
    try:
        watched.revoke()
    finally:
        celery_watch.LOG.removeHandler(handler)
    assert redis_server.proc is not None and redis_server.proc.poll() is None, "Redis is back"
    stats = redis_server.client().info("commandstats")  # type: ignore[attr-defined]
    assert stats["cmdstat_publish"]["calls"] >= 1  # the revoke, broadcast to the workers

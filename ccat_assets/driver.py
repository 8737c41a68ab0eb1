"""Evaluate the real sensors and execute the runs they request until nothing is due.

This is what the Dagster daemon does (tick sensors, skip run keys already launched, launch
runs within the run queue's limits), so that the embedded default and the tests need no
daemon, and like the daemon it keeps each sensor's cursor in the instance between calls (the
instance's key-value store), and holds a lock so that two drives on one deployment never run
the same work twice: the second waits for the first. Runs execute side by side in forked
child processes (runpool.py) within the instance's limits (max_concurrent_runs, and per link
its tag concurrency limit), one child at a time with max_concurrent_runs 1, so that the UI's
Terminate stops any of them and never the drive (before, with one run at a time each run
executed in the drive's own process, and Terminate was refused: "Unable to terminate run").
Only a caller that asks for it (`in_process`: a profiler, a test that scripts a fault in this
process's memory) has each run executed in this process. A run left in progress by a
drive that died (kill -9, power cut) is marked failed by the next drive, so that the
re-attempt sensor requests it again; so is any run on this host whose process is gone (an
operator's `dagster asset materialize` or a UI run killed, a reboot: inflight.py), and runs
in flight elsewhere, which it cannot check, are named. As the daemon's run queue would, it
executes the runs queued (the UI's "Materialize", a backfill) while no daemon dequeues them.
While a Dagster daemon ticks the sensors (`make ui`), the drive ticks no sensor or schedule
and starts no run: it waits for the daemon to finish the work, reporting its runs
(wait_for_daemon).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    Definitions,
    RepositoryDefinition,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    build_schedule_context,
    build_sensor_context,
)
from dagster._core.definitions.dynamic_partitions_request import AddDynamicPartitionsRequest
from dagster._core.definitions.job_base import IJob, InMemoryJob
from dagster._core.definitions.job_definition import JobDefinition
from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository
from dagster._core.definitions.repository_definition import SINGLETON_REPOSITORY_NAME
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.events import DagsterEvent
from dagster._core.execution.api import (
    _job_with_repository_load_data,
    create_execution_plan,
    execute_run,
)
from dagster._core.execution.execute_in_process import merge_run_tags
from dagster._core.instance.utils import RUNLESS_RUN_ID
from dagster._core.remote_origin import (
    ManagedGrpcPythonEnvCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.scheduler.instigation import (
    InstigatorState,
    InstigatorStatus,
    InstigatorTick,
    InstigatorType,
    SensorInstigatorData,
    TickStatus,
)
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.dagster_run import FINISHED_STATUSES
from dagster._core.storage.tags import PARTITION_NAME_TAG
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._utils.error import SerializableErrorInfo
from dagster._utils.schedules import reverse_cron_string_iterator

from ccat_assets.inflight import IN_FLIGHT, close_if_dead, liveness, process_liveness
from ccat_assets.interrupts import stopped_by_no_person
from ccat_assets.routing import partition_of, reroute, stages_of, tag_run
from ccat_assets.runlog import CANCELED as BY_AN_OPERATOR
from ccat_assets.runlog import log_ticks_in_tree, with_run_loggers
from ccat_assets.runpool import DRIVE_STOPPED, Finished, Queued, RunPool, run_limits
from ccat_assets.stages import ASSET_STAGE
from ccat_assets.tags import DAEMON_PROCESS_KEY, DRIVE_TAG, LINK_TAG, NEXT_AT
from ccat_dt.config import Config
from ccat_dt.replicas import NotReady
from ccat_dt.stages import Stage

RUN_KEY = "dagster/run_key"
SENSOR = "dagster/sensor_name"
CURSOR_KEY = "ccat-dt/drive/cursor/"  # + sensor name, in the instance's key-value store
LOCK_FILE = "ccat-dt-drive.lock"  # in the instance's directory (DAGSTER_HOME)
SENSOR_RETRY_S = 1.0  # a sensor whose tick failed is ticked again after this, doubled per
# failure in a row: one that keeps failing (a bug, a partition Dagster does not know) ends the
# drive once its next tick is further away than --wait, instead of ticking every second
# Ticked only in a round in which no other sensor launched a run: every copy due is then
# made or in flight, and the purge sensor leaves a package with a run in flight alone, so a
# package's deletions come in one purge run once its copies are all made, not one per copy
# as each is archived, while other packages' copies go on (the daemon ticks it on its
# interval: there the retention ages batch them).
LAST = "purge_sensor"
# Sensors that only report, tell or tidy up (no runs): ticked at most once per their minimum
# interval during a drive, as the daemon ticks them, and once more as it ends. Ticked every
# round, they were a third of a round's time, and each change of the overview a round more; a
# mail server that accepts connections and never answers held every round for its timeout.
PERIODIC = frozenset({"overview_sensor", "service_level_sensor", "retire_partitions_sensor",
                      "notification_sensor"})
IDLE_TICK_S = 1.0  # while runs execute, work waiting for a back-off is looked at this often
QUEUED_DAEMON = "QUEUED_RUN_COORDINATOR"  # the daemon's part that dequeues queued runs
SENSOR_DAEMON = "SENSOR"  # its part that ticks the sensors (its scheduler runs beside it)
DAEMON_FRESH_S = 120.0  # a daemon whose last heartbeat (every 30 s) is older is not running


@dataclass
class DriveReport:
    launched: list[str] = field(default_factory=list)  # run keys, in launch order
    failed: list[str] = field(default_factory=list)  # run keys whose run failed
    failed_ids: list[str] = field(default_factory=list)  # their run ids, in the same order
    canceled: list[str] = field(default_factory=list)  # run keys of runs an operator
    # terminated (the UI's Terminate, Force termination, a backfill's Cancel), running or
    # waiting: not failures (their work is re-attempted after the back-off)
    canceled_ids: list[str] = field(default_factory=list)  # their run ids, in the same order
    healed: list[str] = field(default_factory=list)  # those of `failed` whose work was done
    # since (see healed_runs): a fault that passed, nothing left for a person
    rounds: int = 0
    dead_runs: list[str] = field(default_factory=list)  # runs of a dead drive, marked failed
    closed_runs: list[str] = field(default_factory=list)  # other runs that never end (their
    # process gone, never started), marked failed
    elsewhere: list[str] = field(default_factory=list)  # runs in flight this drive cannot
    # check (another host or container, no process recorded): left alone, named
    adopted: list[str] = field(default_factory=list)  # queued runs no daemon dequeued,
    # executed by this drive (also in `launched`)
    watched: list[str] = field(default_factory=list)  # the Dagster daemon's runs that ended
    # while this drive waited for it (wait_for_daemon; those failed are in `failed` too)
    sensor_failures: dict[str, str] = field(default_factory=dict)  # sensor -> why its last
    # tick failed, for those still failing when the drive ended
    next_due: datetime | None = None  # the earliest work waiting for a back-off, if any

    @property
    def unhealed(self) -> list[str]:
        """The failed runs whose work no later run did: what `drive` exits 1 for."""
        healed = list(self.healed)
        left = []
        for key in self.failed:
            if key in healed:
                healed.remove(key)
            else:
                left.append(key)
        return left

    def housekeeping(self) -> list[str]:
        """What the drive did to runs it did not request, for its summary line: each kind
        is also named run by run as it happens (DIED, ELSEWHERE, QUEUED lines)."""
        kinds = [(self.dead_runs, "of a dead drive marked failed"),
                 (self.closed_runs, "whose process was gone marked failed"),
                 (self.adopted, "queued with no daemon to start them executed here"),
                 (self.watched, "of the Dagster daemon waited for"),
                 (self.elsewhere, "in flight where this drive cannot check them left alone")]
        return [f"{len(runs)} run(s) {what}" for runs, what in kinds if runs]


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


_held: dict[str, int] = {}  # lock path -> depth, so that `retry` (which drives) nests


@contextlib.contextmanager
def drive_lock(instance: DagsterInstance,
               log: Callable[[str], None] = lambda _: None) -> Iterator[None]:
    """Exclusive use of the deployment's instance by one drive (a file lock in its directory:
    the kernel releases it when the holder dies, however it dies). A second drive waits."""
    path = Path(instance.root_directory) / LOCK_FILE
    key = str(path)
    if _held.get(key):
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            log(f"another ccat-dt drive ({holder}) is running on this deployment; waiting "
                f"for it to finish ({path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
            log("the other drive finished; continuing")
        handle.seek(0)
        handle.truncate()
        handle.write(_me())
        handle.flush()
        _held[key] = 1
        try:
            yield
        finally:
            _held.pop(key, None)
            fcntl.flock(handle, fcntl.LOCK_UN)


def close_dead_runs(instance: DagsterInstance,
                    log: Callable[[str], None] = lambda _: None) -> list[str]:
    """Runs a drive on this host executed that are still in flight, while this process holds
    the drive lock: their drive died with them (no other drive can be running). Marked failed,
    so that the re-attempt sensor requests the work again."""
    host, me = socket.gethostname(), _me()
    dead = []
    for run in instance.get_runs(RunsFilter(statuses=IN_FLIGHT)):
        owner = run.tags.get(DRIVE_TAG)
        if not owner or owner == me or owner.rsplit(":", 1)[0] != host:
            continue
        instance.report_run_failed(run, message=f"the ccat-dt drive that ran it ({owner}) "
                                   "died (killed or the machine stopped)")
        key = run.tags.get(RUN_KEY) or run.run_id
        log(f"DIED   {key} (its drive {owner} is gone)")
        dead.append(key)
    return dead


def close_stuck_runs(instance: DagsterInstance, log: Callable[[str], None] = lambda _: None
                     ) -> tuple[list[str], list[str]]:
    """Every run in flight that never ends (inflight.why_dead: its process on this host is
    gone, or it never started) marked failed, whoever launched it, with the reason in its
    event log; the re-attempt sensor then requests its work. Runs in flight whose process
    cannot be checked from here are left alone and named. Returns (closed, elsewhere)."""
    closed, elsewhere = [], []
    statuses = [status for status in IN_FLIGHT if status != DagsterRunStatus.QUEUED]
    for record in instance.get_run_records(RunsFilter(statuses=statuses)):
        run = record.dagster_run
        why = close_if_dead(instance, record)
        if why is not None:
            log(f"DIED   {_label(run)} (run {run.run_id}: {why})")
            closed.append(_label(run))
            continue
        state = liveness(run)
        if run.status == DagsterRunStatus.STARTED and state.alive is None:
            log(f"ELSEWHERE {_label(run)} (run {run.run_id}) is in flight, {state.why}: "
                "not checked from here; if it is dead, terminate it in the Dagster UI")
            elsewhere.append(_label(run))
    return closed, elsewhere


def _label(run: DagsterRun) -> str:
    """How the drive names a run: its run key, else stage:package:site and the run's id."""
    if run.tags.get(RUN_KEY):
        return run.tags[RUN_KEY]
    stages, partition = stages_of(run), partition_of(run.tags)
    if stages and partition is not None:
        stage = "package" if stages[0] == Stage.PACKAGING else str(stages[0])
        return f"{stage}:{partition[0]}:{partition[1] or '*'}:run-{run.run_id[:8]}"
    return f"{run.job_name}:run-{run.run_id[:8]}"


def live_daemon(instance: DagsterInstance, part: str = QUEUED_DAEMON) -> float | None:
    """Seconds since that part of the Dagster daemon reported, if it runs: its heartbeat is
    younger than DAEMON_FRESH_S and its process is not known to be gone (daemon_gone)."""
    beat = instance.get_daemon_heartbeats().get(part)
    if beat is None:
        return None
    age = time.time() - beat.timestamp
    return age if age < DAEMON_FRESH_S and daemon_gone(instance, part) is None else None


def daemon_gone(instance: DagsterInstance, part: str = SENSOR_DAEMON) -> str | None:
    """Why the Dagster daemon that wrote that part's last heartbeat runs no more, if that can
    be told before its heartbeat is DAEMON_FRESH_S old (a daemon killed, or `make ui`
    stopped, a moment ago): the process recorded as writing that daemon's heartbeats
    (sqlite_storage.SqliteRuns: its daemon id, host, pid and process identity) is provably
    gone, on this host and in this pid namespace (inflight.process_liveness). None otherwise:
    nothing recorded (another storage, a daemon of an older ccat-dt), the record another
    daemon's (a heartbeat written by a daemon not yet recorded, or the other way round), or
    its process on another machine or in another container or still there. Never a live
    daemon's heartbeat taken for a dead one's: the heartbeat names its daemon, and only that
    daemon's process being gone counts."""
    beat = instance.get_daemon_heartbeats().get(part)
    if beat is None:
        return None
    stored = instance.run_storage.get_cursor_values({DAEMON_PROCESS_KEY}).get(DAEMON_PROCESS_KEY)
    try:
        record = json.loads(stored) if stored else None
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("daemon_id") != beat.daemon_id:
        return None
    state = process_liveness(str(record.get("worker", "")), str(record.get("identity", "")))
    return state.why if state.alive is False else None


def drive(defs: Definitions, instance: DagsterInstance, *, max_rounds: int = 10_000,
          schedules: bool = False, due_schedules: bool = False,
          log: Callable[[str], None] = lambda _: None, wait_s: float = 0.0,
          workers: int | None = None, in_process: bool = False,
          requests: Sequence[tuple[RunRequest, str]] = ()) -> DriveReport:
    """Tick every sensor, run what it asks for; repeat until a round changes nothing (no run,
    no cursor moved) and no run is left. Work waiting for a back-off due within `wait_s` is
    waited for. With `schedules`, every schedule is ticked once first, as if its time had
    come; with `due_schedules` (`ccat-dt drive`), those whose cron tick came since drive last
    ticked them (see tick_due_schedules). `requests`: runs asked for before any sensor ticks,
    each with its origin (`ccat-dt retry`'s), executed like the sensors'. `workers`: runs at
    once, each in a child process (default: the instance's max_concurrent_runs). With
    `in_process`, each run executes in this process instead, one after the other: nothing
    then stops one the UI terminates (only a profiler, or a test that scripts a fault in
    this process's memory, asks for it)."""
    with drive_lock(instance, log):
        most, tag_limits = run_limits(instance)
        workers = most if workers is None else workers
        config = _config_of(defs)
        route = ((lambda run: reroute(instance, config, run)) if config is not None
                 else (lambda run: run))
        pool = (None if in_process else RunPool(instance, max(1, workers), tag_limits, route,
                                                lambda run: claim(instance, run)))
        with _terminating(pool, log, DriveReport()) as report:
            return _drive(defs, instance, report, pool, max_rounds=max_rounds,
                          schedules=schedules, due_schedules=due_schedules, log=log,
                          wait_s=wait_s, requests=requests)


def enqueue(instance: DagsterInstance, run: DagsterRun) -> DagsterRun:
    """A run the drive created (NOT_STARTED) made QUEUED, as the run coordinator's submit
    does, to wait in the drive's pool for its link: the UI's Terminate cancels a QUEUED run,
    and refuses a NOT_STARTED one ("could not be terminated due to having status
    NOT_STARTED"), which was then executed all the same."""
    instance.report_dagster_event(DagsterEvent.job_enqueue(run), run_id=run.run_id)
    return instance.get_run_by_id(run.run_id) or run


def claim(instance: DagsterInstance, run: DagsterRun) -> DagsterRun | None:
    """A queued run (the drive's own, or adopted) made this drive's as it starts: tagged
    (close_dead_runs closes it if the drive dies) and STARTING, as the daemon's launch does.
    None if it is QUEUED no more (terminated, deleted, dequeued by a daemon), if a Dagster
    daemon's queue runs now (the run is left to it: it dequeues every queued run, and both
    starting it would execute it twice), or if an operator's cancel came as it was claimed
    (its event in the run's log: Dagster's cancel of a QUEUED run and this claim each read
    the status, then write theirs): then it is marked CANCELED, not executed. Drives on one
    deployment claim one at a time (drive_lock)."""
    now = instance.get_run_by_id(run.run_id)
    if now is None or now.status != DagsterRunStatus.QUEUED or live_daemon(instance):
        return None
    instance.add_run_tags(run.run_id, {DRIVE_TAG: _me()})
    instance.report_engine_event(
        f"no Dagster daemon dequeues runs: ccat-dt drive {_me()} executes it", now)
    instance.report_dagster_event(DagsterEvent(
        event_type_value=DagsterEventType.RUN_STARTING.value, job_name=run.job_name),
        run_id=run.run_id)
    started = instance.get_run_by_id(run.run_id)
    if started is not None and instance.all_logs(run.run_id, of_type={
            DagsterEventType.RUN_CANCELING, DagsterEventType.RUN_CANCELED}):
        instance.report_run_canceled(started, message="canceled as the drive started it")
        return None
    return started


class _Signals:
    """SIGINT and SIGTERM the drive received, read from the pipe Python's C-level handler
    writes each signal's number to (signal.set_wakeup_fd), whichever Python handler then
    runs. Kept as well as raised, because the KeyboardInterrupt can be lost: raised in a
    garbage collector's callback or a `__del__` (Python prints "Exception ignored in ..." and
    a traceback), or taken by Dagster while it executes a run in this process (it fails the
    run and returns). The drive must stop all the same (it went on and exited 1, not 130):
    `check` raises it again, and `unraisable` (sys.unraisablehook) keeps that traceback from
    the operator's terminal."""

    def __init__(self) -> None:
        self.pipe: tuple[int, int] | None = None
        self.received = False
        self.hook: Callable[[Any], object] = sys.__unraisablehook__

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        reader, writer = self.pipe = os.pipe()
        os.set_blocking(reader, False)
        os.set_blocking(writer, False)
        self.received, self.hook = False, sys.unraisablehook
        sys.unraisablehook = self.unraisable
        previous = signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
        try:
            yield
        finally:
            signal.set_wakeup_fd(previous)
            sys.unraisablehook = self.hook
            os.close(reader)
            os.close(writer)
            self.pipe = None

    def check(self) -> None:
        if self.came():
            raise KeyboardInterrupt

    def came(self) -> bool:
        """Whether SIGINT or SIGTERM came (kept: `check` raises it)."""
        if self.pipe is not None and not self.received:
            with contextlib.suppress(BlockingIOError):
                while numbers := os.read(self.pipe[0], 512):
                    self.received |= bool({signal.SIGINT, signal.SIGTERM} & set(numbers))
        return self.received

    def unraisable(self, unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            self.hook(unraisable)


_SIGNALLED = _Signals()


@contextlib.contextmanager
def _terminating(pool: RunPool | None, log: Callable[[str], None],
                 report: DriveReport) -> Iterator[DriveReport]:
    """Within: SIGTERM and SIGINT interrupt the drive as Ctrl-C does (KeyboardInterrupt,
    Dagster's own convention); either way its children are stopped and their runs marked
    CANCELED, an operator's cancel (RunPool.terminate), before the drive lock is released.

    Both, because Dagster points SIGTERM at SIGINT's handler each time it leaves a block of
    user code: a drive started with SIGINT ignored (a `&` job of a script, cron) otherwise
    ignored SIGTERM after its first sensor tick and ran on to the end."""
    main = threading.current_thread() is threading.main_thread()
    previous = ({number: signal.signal(number, signal.default_int_handler)
                 for number in (signal.SIGINT, signal.SIGTERM)} if main else {})
    try:
        with _SIGNALLED.listening() if main else contextlib.nullcontext():
            yield report
            _SIGNALLED.check()
    except BaseException as exc:
        for done in pool.terminate() if pool is not None else []:
            _finished(report, log, done)
        if isinstance(exc, DagsterExecutionInterruptedError):
            # the signal came while Dagster held it (a tick's resources being built): the
            # same interruption, told the same way (the CLI exits 130)
            raise KeyboardInterrupt from exc
        raise
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _drive(defs: Definitions, instance: DagsterInstance, report: DriveReport,
           pool: RunPool | None, *, max_rounds: int, schedules: bool, due_schedules: bool,
           log: Callable[[str], None], wait_s: float,
           requests: Sequence[tuple[RunRequest, str]]) -> DriveReport:
    repository = defs.get_repository_def()
    runs = _Runs(repository, instance, report, log, pool, _config_of(defs))
    report.dead_runs = close_dead_runs(instance, log)
    report.closed_runs, report.elsewhere = close_stuck_runs(instance, log)
    for request, origin in requests:  # before the sensors, which then see them in flight
        runs.request(request, origin, None)
    beat = instance.get_daemon_heartbeats().get(SENSOR_DAEMON)
    if beat is not None and time.time() - beat.timestamp < DAEMON_FRESH_S \
            and (gone := daemon_gone(instance)):
        log(f"the Dagster daemon stopped (its heartbeat {time.time() - beat.timestamp:.0f} s "
            f"ago, but {gone}): this drive ticks the sensors itself")
    if due_schedules and not schedules and live_daemon(instance, SENSOR_DAEMON) is None:
        tick_due_schedules(defs, instance, report, log, runs=runs)
    stopped = stopped_by_operator(instance)
    for name in sorted(stopped):
        log(f"{name} is stopped (the UI's toggle or `dagster sensor stop`): not ticked")
    if schedules:
        for schedule_def in repository.schedule_defs:
            if schedule_def.name in stopped:
                continue
            with build_schedule_context(instance=instance, resources=defs.resources,
                                        repository_def=repository,
                                        scheduled_execution_time=datetime.now(UTC)) as context:
                log_ticks_in_tree(context, schedule_def.name)
                data = schedule_def.evaluate_tick(context)
            for run in data.run_requests or []:
                runs.request(run, schedule_def.name, schedule_def.job_name)
    # Sensors that create partitions tick first, so placement requests never name a package
    # the instance has not registered yet (an OpsDB ahead of a fresh or restored instance);
    # the purge after the others (LAST); the notification sensor last, so that it sees what
    # this round's sensors recorded.
    sensors = sorted((s for s in repository.sensor_defs if s.name not in stopped), key=lambda s: (
        s.name not in ("package_sensor", "staging_sensor"), s.name == "notification_sensor",
        s.name == LAST))
    stored = instance.run_storage.get_cursor_values({CURSOR_KEY + s.name for s in sensors})
    cursors: dict[str, str | None] = {s.name: stored.get(CURSOR_KEY + s.name) for s in sensors}
    ui: dict[str, list[InstigatorState]] = {}  # sensor -> its states in the instance
    failures: dict[str, int] = {}  # sensor -> ticks failed in a row
    retry_at: dict[str, float] = {}  # sensor -> when a failing one is ticked again

    def tick(sensor_def: SensorDefinition) -> tuple[bool, float | None]:
        """One tick, its requests carried out: (a cursor moved, when work it waits for is due)."""
        name = sensor_def.name
        # The driver's own instance, not a new one built from the ref at every tick (that
        # cost ~0.1 s a tick: storage set-up and schema checks); with the ref as well, the
        # partitions a tick adds count when its run requests are checked.
        # Only the resources the sensor asks for: Dagster builds (and copies, with their
        # nested resources) every one it is given at every tick; the IO managers cost a third
        # of an idle tick.
        needed = {key: resource for key, resource in (defs.resources or {}).items()
                  if key in sensor_def.required_resource_keys}
        try:
            with build_sensor_context(instance=instance, instance_ref=instance.get_ref(),
                                      cursor=cursors.get(name), repository_def=repository,
                                      resources=needed, sensor_name=name) as context:
                log_ticks_in_tree(context, name)
                data = sensor_def.evaluate_tick(context)
        except Exception as exc:  # noqa: BLE001 - as the daemon: this tick fails, the next
            # one tries again (an OpsDB locked for a moment, say)
            failures[name] = failures.get(name, 0) + 1
            delay = SENSOR_RETRY_S * 2 ** min(failures[name] - 1, 20)
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            report.sensor_failures[name] = why
            log(f"sensor {name} failed ({why}); ticked again in {delay:g} s")
            retry_at[name] = time.time() + delay
            return False, retry_at[name]
        failures.pop(name, None)
        retry_at.pop(name, None)
        report.sensor_failures.pop(name, None)
        for request in data.dynamic_partitions_requests or []:
            if isinstance(request, AddDynamicPartitionsRequest):
                instance.add_dynamic_partitions(request.partitions_def_name,
                                                list(request.partition_keys))
            else:
                for key in request.partition_keys:
                    instance.delete_dynamic_partition(request.partitions_def_name, key)
        for event in data.asset_events or []:  # the operator overview (sensors/overview.py)
            instance.report_runless_asset_event(event)
        for run in data.run_requests or []:
            runs.request(run, name, _default_job(sensor_def))
        # Stored only once its runs are created (executed, one at a time): a drive killed
        # before this re-reads the page, and the run keys already taken make that a no-op; a
        # run the killed drive left in flight is failed by the next drive (close_dead_runs)
        # and requested again by the re-attempt sensor.
        moved = False
        if data.cursor is not None and data.cursor != cursors.get(name):
            moved = _is_position(data.cursor) and name not in PERIODIC
            cursors[name] = data.cursor
            instance.run_storage.set_cursor_values({CURSOR_KEY + name: data.cursor})
            ui[name] = _show_cursor(instance, ui.get(name, []), data.cursor)
        return moved, _next_at(data.cursor)

    ticked_at = dict.fromkeys(PERIODIC, -math.inf)  # the periodic sensors' last ticks
    round_started = -math.inf
    left_to_daemon = False
    for _ in range(max_rounds):
        _SIGNALLED.check()
        report.rounds += 1
        round_started = time.monotonic()
        if live_daemon(instance, SENSOR_DAEMON) is not None:
            left_to_daemon = wait_for_daemon(instance, report, runs, sensors, log, wait_s)
            if left_to_daemon:
                break
            continue  # the daemon stopped: this drive ticks the sensors again
        launched_before, moved = len(report.launched), False
        ui = _cursors_set_in_ui(instance, cursors, log)  # "Edit cursor" since the last round
        runs.adopt_queued()  # before the sensors, which then see them in flight
        next_due: float | None = None
        for sensor_def in sensors:
            name = sensor_def.name
            if name == LAST and len(report.launched) > launched_before:
                continue  # copies just requested: a later round
            if name in PERIODIC:
                if time.monotonic() - ticked_at[name] < (sensor_def.minimum_interval_seconds or 0):
                    continue
                ticked_at[name] = time.monotonic()
            due: float | None = retry_at.get(name)
            if due is not None and due > time.time():  # failing: not before its back-off
                changed = False
            else:
                changed, due = tick(sensor_def)
            moved = moved or changed
            if due is not None:
                next_due = due if next_due is None else min(next_due, due)
        report.next_due = (datetime.fromtimestamp(next_due, UTC) if next_due is not None
                           else None)
        if runs.busy:  # tick again once a run ended (what it made may be due next), or
            # when work waiting for a back-off falls due; not while runs wait for a free
            # slot: a round of ticks (~13 sensors) per ended run cost more than the runs
            # themselves with many small packages (500 packaging runs: 1.3 s a run)
            runs.wait(None if next_due is None
                      else max(IDLE_TICK_S, next_due - time.time()))
            while runs.waiting and (next_due is None or next_due > time.time()):
                runs.wait(None if next_due is None
                          else max(IDLE_TICK_S, next_due - time.time()))
            continue
        if len(report.launched) > launched_before or moved:
            continue
        if next_due is None or next_due - time.time() > wait_s:
            break
        time.sleep(max(0.0, next_due - time.time()))
    while runs.busy:  # max_rounds reached with runs still executing: they finish first
        runs.wait(None)
    # The periodic sensors once more unless the last round ticked them, so that what they
    # show (the UI's overview, the service level) is the drive's end state. One whose tick
    # fails is ticked again after its back-off while that is within wait_s, as in the rounds:
    # an OpsDB that dropped its connections for a moment must not end the drive "failing".
    final = [] if left_to_daemon else [  # the daemon ticks them
        s for s in sensors if s.name in PERIODIC and ticked_at[s.name] < round_started]
    while final:
        for sensor_def in final:
            if retry_at.get(sensor_def.name, -math.inf) <= time.time():
                tick(sensor_def)
        final = [s for s in final
                 if s.name in retry_at and retry_at[s.name] - time.time() <= wait_s]
        if final:
            _SIGNALLED.check()
            time.sleep(max(0.0, min(retry_at[s.name] for s in final) - time.time()))
    report.healed = healed_runs(instance, report)
    return report


WATCH_POLL_S = 1.0  # how often a drive waiting for the daemon looks at its runs and ticks


def wait_for_daemon(instance: DagsterInstance, report: DriveReport, runs: _Runs,
                    sensors: list[SensorDefinition], log: Callable[[str], None],
                    wait_s: float) -> bool:
    """While a Dagster daemon ticks the sensors (`make ui`, `dagster-daemon run`), the drive
    ticks none and starts no run: it waits until the daemon has nothing left to do, naming
    each run that ends meanwhile as it names its own (a failed one counts as its own). Both
    ticking, the same work was launched twice: each checks for a run of the run key, then
    creates its own, and the other's run came in between (a package built by one run and
    found "already built" by the other). True once the daemon is done; False if it stopped
    meanwhile (no heartbeat for DAEMON_FRESH_S): the drive then ticks the sensors itself."""
    age = live_daemon(instance, SENSOR_DAEMON) or 0.0
    log(f"a Dagster daemon ticks the sensors of this deployment (its heartbeat {age:.0f} s "
        "ago): this drive starts no run; it waits until the daemon has nothing left to do")
    since, reported = time.time(), set[str]()
    while live_daemon(instance, SENSOR_DAEMON) is not None:
        if runs.busy:  # its own, started before the daemon was seen
            runs.wait(WATCH_POLL_S)
        else:
            _SIGNALLED.check()
            time.sleep(WATCH_POLL_S)
        for record in instance.get_run_records(RunsFilter(
                statuses=list(FINISHED_STATUSES), updated_after=datetime.fromtimestamp(since, UTC)),
                order_by="update_timestamp", ascending=True):
            run = record.dagster_run
            if run.run_id not in reported and run.tags.get(DRIVE_TAG) != _me():
                reported.add(run.run_id)
                report.watched.append(_label(run))
                _finished(report, log, Finished(
                    _label(run), run.status == DagsterRunStatus.SUCCESS, run.run_id,
                    terminated=run.status == DagsterRunStatus.CANCELED))
        if not runs.busy and _daemon_done(instance, report, sensors, since, wait_s):
            return True
    why = daemon_gone(instance) or f"no heartbeat for {DAEMON_FRESH_S:.0f} s"
    log(f"the Dagster daemon stopped ({why}): this drive ticks the sensors itself")
    return False


def _daemon_done(instance: DagsterInstance, report: DriveReport,
                 sensors: list[SensorDefinition], since: float, wait_s: float) -> bool:
    """No run in flight, and each sensor (PERIODIC aside) ticked by the daemon since the last
    run changed, asking for nothing, its cursor where its tick before left it (a sensor
    paging through OpsDB at its last page: as the drive's round that changed nothing); work
    waiting for a back-off not due within `wait_s`. A sensor whose tick failed, or that the
    daemon leaves unticked for DAEMON_FRESH_S past its interval, is reported as failing."""
    if instance.get_runs(RunsFilter(statuses=IN_FLIGHT), limit=1):
        return False
    latest = instance.get_run_records(limit=1, order_by="update_timestamp")
    quiet = max([since, *(record.update_timestamp.timestamp() for record in latest)])
    stopped = stopped_by_operator(instance)
    ticks: dict[str, list[InstigatorTick]] = {}  # sensor -> its finished ticks, newest first
    for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        done = [tick for tick in instance.get_ticks(state.instigator_origin_id, state.selector_id,
                                                    limit=3) if tick.status != TickStatus.STARTED]
        mine = ticks.get(state.instigator_name)
        if done and (not mine or done[0].timestamp > mine[0].timestamp):
            ticks[state.instigator_name] = done  # of the code location ticked last
    now, idle, next_due = time.time(), True, None
    for sensor_def in sensors:
        name, done = sensor_def.name, ticks.get(sensor_def.name, [])
        if name in PERIODIC or name in stopped:
            continue
        if not done or done[0].timestamp <= quiet:
            unticked = now - quiet
            if unticked > DAEMON_FRESH_S + (sensor_def.minimum_interval_seconds or 30):
                report.sensor_failures[name] = (f"the Dagster daemon has not ticked it in "
                                                f"the {unticked:.0f} s since the last run "
                                                "(its log says why)")
            else:
                idle = False
            continue
        tick = done[0]
        if tick.status == TickStatus.FAILURE:
            lines = tick.error.message.strip().splitlines() if tick.error else []
            report.sensor_failures[name] = lines[0] if lines else "its tick failed"
        else:
            report.sensor_failures.pop(name, None)
            idle = idle and not tick.run_ids and not (
                tick.cursor and _is_position(tick.cursor)
                and len(done) > 1 and done[1].cursor != tick.cursor)
        if (due := _next_at(tick.cursor)) is not None:
            next_due = due if next_due is None else min(next_due, due)
    report.next_due = datetime.fromtimestamp(next_due, UTC) if next_due is not None else None
    return idle and (next_due is None or next_due - now > wait_s)


def _cursors_set_in_ui(instance: DagsterInstance, cursors: dict[str, str | None],
                       log: Callable[[str], None]) -> dict[str, list[InstigatorState]]:
    """The sensors' states in the instance, where the UI's sensor page reads and writes the
    cursor ("Edit cursor", "Clear cursor") and the daemon keeps it. The drive keeps its own
    (CURSOR_KEY) and shows it there (_show_cursor); one that differs there was set since, by
    an operator or the daemon: the drive ticks from it (stored in `cursors`, the drive's).
    Before, an edit in the UI never reached the drive's ticks and the UI showed a cursor
    the drive did not use."""
    states: dict[str, list[InstigatorState]] = {}
    for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        if state.instigator_name in cursors:
            states.setdefault(state.instigator_name, []).append(state)
    for name, found in states.items():
        data = [s.instigator_data for s in found]
        edited = [d.cursor for d in data if isinstance(d, SensorInstigatorData)
                  and (d.cursor or None) != (cursors[name] or None)]
        if edited:
            log(f"the cursor of {name} was set in the Dagster UI (or by its daemon): "
                f"{edited[0]!r}, was {cursors[name]!r}; ticked from it")
            cursors[name] = edited[0]
            instance.run_storage.set_cursor_values({CURSOR_KEY + name: edited[0] or ""})
            states[name] = _show_cursor(instance, found, edited[0])
    return states


def _show_cursor(instance: DagsterInstance, states: list[InstigatorState],
                 cursor: str | None) -> list[InstigatorState]:
    """The sensor's states in the instance with the drive's cursor, as the daemon keeps it:
    the UI's sensor page shows where the drive is."""
    shown = []
    for state in states:
        data = state.instigator_data
        if isinstance(data, SensorInstigatorData) and (data.cursor or None) != (cursor or None):
            state = state.with_data(data._replace(cursor=cursor))
            instance.update_instigator_state(state)
        shown.append(state)
    return shown


def stopped_by_operator(instance: DagsterInstance) -> set[str]:
    """Sensors and schedules an operator stopped (the UI's toggle, `dagster sensor stop`):
    drive leaves them alone, as the daemon does (a purge sensor stopped to freeze deletions
    stays stopped under a cron-driven drive)."""
    return {state.instigator_name for state in instance.all_instigator_state(
        instigator_statuses={InstigatorStatus.STOPPED})}


def _config_of(defs: Definitions) -> Config | None:
    """The deployment's configuration, to route runs launched without a link tag."""
    config = getattr((defs.resources or {}).get("deployment"), "config", None)
    return config if isinstance(config, Config) else None


SCHEDULE_CURSOR = "ccat-dt/drive/schedule/"  # + schedule name: the last tick drive evaluated


def tick_due_schedules(defs: Definitions, instance: DagsterInstance, report: DriveReport,
                       log: Callable[[str], None] = lambda _: None,
                       now: datetime | None = None, *, runs: _Runs | None = None) -> list[str]:
    """Evaluate each schedule whose latest cron tick is newer than the one drive last evaluated
    (kept in the instance's key-value store, so it holds across `ccat-dt drive` invocations),
    as the daemon would at that tick; a schedule never ticked by drive is due at once. Without
    this, a deployment driven by cron + `ccat-dt drive` instead of the daemon never ran the
    fixity scrub. Missed ticks are not replayed: only the latest is evaluated (the scrub reads
    its hourly share; the longest-unverified copies come first anyway). Returns the names
    ticked."""
    now = now or datetime.now(UTC)
    repository = defs.get_repository_def()
    runs = runs or _Runs(repository, instance, report, log, None, None)
    ticked = []
    stopped = stopped_by_operator(instance)
    for schedule_def in repository.schedule_defs:
        if schedule_def.name in stopped:
            continue
        key = SCHEDULE_CURSOR + schedule_def.name
        cron = schedule_def.cron_schedule
        latest = max(next(reverse_cron_string_iterator(
            now.timestamp(), one, schedule_def.execution_timezone or "UTC"))
            for one in ([cron] if isinstance(cron, str) else cron))
        last = instance.run_storage.get_cursor_values({key}).get(key)
        if last is not None and datetime.fromisoformat(last) >= latest:
            continue
        with build_schedule_context(instance=instance, resources=defs.resources,
                                    repository_def=repository,
                                    scheduled_execution_time=latest) as context:
            log_ticks_in_tree(context, schedule_def.name)
            data = schedule_def.evaluate_tick(context)
        for run in data.run_requests or []:
            runs.request(run, schedule_def.name, schedule_def.job_name)
        instance.run_storage.set_cursor_values({key: latest.isoformat()})
        ticked.append(schedule_def.name)
    return ticked


def _is_position(cursor: str) -> bool:
    """A cursor that is a position in OpsDB (an id) moved: a page was read, there may be more.
    A JSON cursor (the re-attempt sensor's) only reports."""
    return not cursor.startswith("{")


def _next_at(cursor: str | None) -> float | None:
    if not cursor or not cursor.startswith("{"):
        return None
    value = json.loads(cursor).get(NEXT_AT)
    return float(value) if value is not None else None


def launch(defs: Definitions, instance: DagsterInstance, run: RunRequest, *, origin: str,
           report: DriveReport, log: Callable[[str], None] = lambda _: None) -> None:
    """Execute one run request as a drive's, in this process (as `drive(in_process=True)`:
    for a test that scripts a fault in this process's memory; nothing stops it if the UI
    terminates it). `ccat-dt retry` hands its runs to a drive instead (`requests`)."""
    _Runs(defs.get_repository_def(), instance, report, log, None, None).request(
        run, origin, None)


def _default_job(sensor_def: SensorDefinition) -> str | None:
    """The sensor's only job; None for a multi-job sensor (its requests name their job)."""
    return sensor_def.job_name if len(sensor_def.targets) == 1 else None


@dataclass
class _Runs:
    """Where a drive's run requests go: created here and queued in the pool, which executes
    them in child processes; or, without a pool (`in_process`), executed at once in this
    process."""

    repository: RepositoryDefinition
    instance: DagsterInstance
    report: DriveReport
    log: Callable[[str], None]
    pool: RunPool | None
    config: Config | None
    told: set[str] = field(default_factory=set)  # queued runs named once as not adopted

    @property
    def busy(self) -> bool:
        return self.pool is not None and self.pool.busy

    @property
    def waiting(self) -> bool:
        """Runs created and queued, waiting for a free slot."""
        return self.pool is not None and bool(self.pool.queue)

    def wait(self, timeout: float | None) -> None:
        """Until a run ended (or `timeout`); each run that ended is reported."""
        assert self.pool is not None
        finished = self.pool.wait(timeout)
        if _SIGNALLED.came():  # the drive stopped: its children, which the terminal's Ctrl-C
            # reached as well, may have ended their runs for it before the drive saw it; told
            # (CANCELED: an operator's doing) by the pool's `terminate`, with the others
            self.pool.unreported[:0] = finished
            raise KeyboardInterrupt
        for done in finished:
            _finished(self.report, self.log, done)

    def _execute_here(self, key: str, job: IJob, run: DagsterRun) -> None:
        """One run at a time, in this process (no pool)."""
        ok = execute_run(job, run, self.instance).success
        now = self.instance.get_run_by_id(run.run_id)
        stopped = _SIGNALLED.came()
        if now is not None and now.status == DagsterRunStatus.FAILURE and stopped:
            # Dagster took the drive's Ctrl-C (SIGTERM) as the run's and failed it: an
            # operator stopped it, as RunPool.terminate tells the runs of a pool's children
            stopped_by_no_person(self.instance, run.run_id, "drive")
            self.instance.report_run_canceled(now, message=DRIVE_STOPPED)
            now = self.instance.get_run_by_id(run.run_id)
        _finished(self.report, self.log, Finished(
            key, ok, run.run_id,
            terminated=now is not None and now.status == DagsterRunStatus.CANCELED,
            stopped=stopped))
        _SIGNALLED.check()  # Dagster took a Ctrl-C as the run's, and returned

    def request(self, run: RunRequest, origin: str, default_job: str | None) -> None:
        instance = self.instance
        if run.run_key and instance.get_runs(
                RunsFilter(tags={RUN_KEY: run.run_key, SENSOR: origin}), limit=1):
            return  # a replayed tick: this run was launched before
        job = self.repository.get_job(run.job_name or default_job or "")
        if run.asset_check_keys is not None:  # checks alone (or a subset), as the daemon runs it
            job = job.get_subset(asset_selection=set(run.asset_selection or ()),
                                 asset_check_selection=set(run.asset_check_keys))
        tags = {**run.tags, RUN_KEY: run.run_key or "", SENSOR: origin}
        if self.pool is None:  # executed at once; a queued run is the drive's as it starts
            tags[DRIVE_TAG] = _me()
        run_config = with_run_loggers(run.run_config)  # quiet under the CLI (runlog.py)
        key = run.run_key or job.name
        created, runnable = _create(job, instance, run.partition_key, run_config, tags)
        if not created.tags.get(LINK_TAG) and self.config is not None:
            created = tag_run(instance, self.config, created)  # as RoutedRunCoordinator does
        self.report.launched.append(key)
        if self.pool is None:
            self._execute_here(key, runnable, created)
        else:
            self.pool.submit(Queued(key, enqueue(instance, created), runnable))

    def adopt_queued(self) -> None:
        """Execute the runs queued (the UI's "Materialize", a backfill, `dagster job launch`),
        oldest first, while no daemon dequeues them: as its run queue would, within the same
        limits. A run of a job this code location does not have is named, not touched."""
        instance = self.instance
        queued = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.QUEUED]),
                                   ascending=True)
        if not queued:
            return
        age = live_daemon(instance)
        if age is not None:
            if "daemon" not in self.told:
                self.told.add("daemon")
                self.log(f"{len(queued)} queued run(s) left to the Dagster daemon (its "
                         f"heartbeat {age:.0f} s ago)")
            return
        held = {waiting.run.run_id for waiting in self.pool.queue} if self.pool else set()
        for run in queued:
            if run.run_id in held:
                continue  # adopted before, waiting in the pool for its link
            if self.repository.has_job(run.job_name):
                self.adopt(run)
            elif run.run_id not in self.told:
                self.told.add(run.run_id)
                self.log(f"QUEUED {_label(run)} (run {run.run_id}): no Dagster daemon runs, "
                         f"and job {run.job_name} is not ccat-dt's; left queued")

    def adopt(self, run: DagsterRun) -> None:
        """A queued run executed like the drive's own: in the pool it waits QUEUED for its
        link, claimed (`claim`) only as it starts, so that until then the UI's Terminate and a
        backfill's Cancel stop it as they stop any queued run. Before, it was marked STARTING
        at once, which Dagster cancels in neither way: it was executed all the same."""
        instance, key = self.instance, _label(run)
        job = self.repository.get_job(run.job_name)
        runnable: IJob = (InMemoryJob(job) if job.executor_def.name == "in_process"
                          else _reconstructable(job))
        if self.pool is not None:
            self.log(f"QUEUED {key} (run {run.run_id}): no Dagster daemon runs; executed here")
            self.report.launched.append(key)
            self.report.adopted.append(key)
            self.pool.submit(Queued(key, run, runnable, adopted=True))
            return
        started = claim(instance, run)
        if started is None:
            return  # canceled, or dequeued by a daemon that just started
        if self.config is not None:  # routed when it was submitted: its link may have changed
            started = reroute(instance, self.config, started)
        self.log(f"QUEUED {key} (run {run.run_id}): no Dagster daemon runs; executed here")
        self.report.launched.append(key)
        self.report.adopted.append(key)
        self._execute_here(key, runnable, started)


def _finished(report: DriveReport, log: Callable[[str], None], done: Finished) -> None:
    if done.deleted:  # an operator's Delete in the UI: not a failure of its work
        log(f"DELETED {done.key} (run {done.run_id}): deleted in the Dagster UI; work still "
            "due is asked for again by the re-attempt sensor's sweep for unattended work")
        return
    if done.canceled or done.terminated:  # an operator's Terminate (Force termination), a
        # backfill's Cancel: what a person asked for, not a failure of the run's work (nor
        # of the system); the work still due is re-attempted after the back-off
        report.canceled.append(done.key)
        report.canceled_ids.append(done.run_id)
        if done.stopped:  # the drive stopped (Ctrl-C, SIGTERM): as an operator's cancel
            log(f"CANCELED {done.key} (run {done.run_id}): the drive was stopped (Ctrl-C, "
                "SIGTERM) " + ("before it started; not executed" if done.canceled else
                               "while it ran; interrupted") + "; no failed attempt: the "
                "next drive does its work after the back-off")
        elif done.canceled:  # before it started: nothing was done
            log(f"CANCELED {done.key} (run {done.run_id}): terminated in the Dagster UI (or "
                "its backfill canceled) before it started; not executed; work still due is "
                "re-attempted after the back-off")
        else:
            log(f"CANCELED {done.key} (run {done.run_id}): {BY_AN_OPERATOR}")
        return
    if done.taken:
        log(f"TAKEN  {done.key} (run {done.run_id}): {done.taken} meanwhile, not by this "
            "drive (a Dagster daemon's queue runs now); not executed here")
        return
    log(f"{'ok    ' if done.ok else 'FAILED'} {done.key}")
    if not done.ok:
        report.failed.append(done.key)
        report.failed_ids.append(done.run_id)


HEAL_LOOK = 20  # the newest materializations of a partition looked at for a run's


def healed_runs(instance: DagsterInstance, report: DriveReport) -> list[str]:
    """The keys of the report's failed runs that nobody needs to act for any more:

    - a run that failed transiently and whose work was done after it failed: a fault that
      passed (OpsDB locked, the link down: retried in the run until its attempts ran out)
      and nothing left to do. Its work done: every asset of its stages materialised for its
      partition by a run since it ended (its automatic re-attempt, a later run, the UI's
      Materialize);
    - a run failed by a blocking check that found its copy bad (a recheck of a rotten copy:
      the system doing its job, the copy quarantined), once the copy was made again and
      passes that check: each such partition materialised by a run since (the repair) and
      its check's latest result, on that materialization, passed. While no repair has (none
      can: no intact copy left, and a person is told), it stays a failure.

    Never healed: a failure decided as final (a refused deletion, a source changed after
    filing: not retryable; a copy whose source was not there yet is healed once a later run
    made it), a run whose process died. (A run an operator terminated is no
    failure: `canceled`, not `failed`.)"""
    healed = []
    for key, run_id in zip(report.failed, report.failed_ids, strict=True):
        record = instance.get_run_record_by_id(run_id) if run_id else None
        if (record is None or record.end_time is None
                or record.dagster_run.status != DagsterRunStatus.FAILURE):
            continue
        run = record.dagster_run
        if (found := _found_bad(instance, run_id)) is not None:
            if all(_made_since(instance, asset, partition, record.end_time)
                   and _passes_now(instance, asset, check, partition)
                   for asset, check, partition in found):
                healed.append(key)
            continue
        partition = run.tags.get(PARTITION_NAME_TAG)
        assets = [name for name, stage in ASSET_STAGE.items() if stage in stages_of(run)]
        if partition is None or not assets or not _transient(instance, run_id):
            continue
        if all(_made_since(instance, name, partition, record.end_time) for name in assets):
            healed.append(key)
    return healed


def _found_bad(instance: DagsterInstance, run_id: str) -> list[tuple[str, str, str]] | None:
    """(asset, check, partition) of each blocking check that failed the run, when nothing
    else did (every failed step failed on Dagster's "blocking asset check failed"); None
    otherwise."""
    errors = [record.dagster_event.step_failure_data.error
              for record in instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE)
              if record.dagster_event is not None]
    if not errors or not all(error is not None and CHECK_FAILED in (
            error.cls_name, error.cause.cls_name if error.cause else None) for error in errors):
        return None
    found = []
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION):
        event = record.dagster_event
        evaluation = event.event_specific_data if event is not None else None
        if (isinstance(evaluation, AssetCheckEvaluation) and not evaluation.passed
                and evaluation.severity == AssetCheckSeverity.ERROR
                and evaluation.partition is not None):
            found.append((evaluation.asset_key.to_user_string(), evaluation.check_name,
                          evaluation.partition))
    return found or None


CHECK_FAILED = "DagsterAssetCheckFailedError"  # a blocking check failed with ERROR severity


def _passes_now(instance: DagsterInstance, asset: str, check: str, partition: str) -> bool:
    """Whether the check's latest result on the partition passed, on its latest
    materialization (what the UI shows green)."""
    infos = instance.event_log_storage.get_asset_check_partition_info(
        [AssetCheckKey(AssetKey(asset), check)], partition_keys=[partition])
    return any(info.is_current and info.latest_execution_status
               == AssetCheckExecutionRecordStatus.SUCCEEDED for info in infos)


def _made_since(instance: DagsterInstance, asset: str, partition: str, since: float) -> bool:
    """Whether a run materialized the asset's partition after `since`: one reported by hand
    (the UI's "Report materialization events": runless) proves no work done (before, it
    healed a failed copy whose copy was never made, and `drive` exited 0)."""
    records = instance.fetch_materializations(AssetRecordsFilter(
        asset_key=AssetKey(asset), asset_partitions=[partition], after_timestamp=since),
        limit=HEAL_LOOK).records
    return any(r.run_id != RUNLESS_RUN_ID for r in records)


def _transient(instance: DagsterInstance, run_id: str) -> bool:
    """Whether every step of the run failed on an error its retry policy retried (Dagster's
    RetryRequestedFromPolicy once its attempts ran out), on its partition deleted in the
    UI between two of its steps (each step adds it back as it ends: partitions.keep_partition;
    its re-attempt revives it), or on its copy's source not there yet (replicas.NotReady: a
    "Materialize" clicked before its upstream, the copy to the second archive before the
    first archived it; the sensors make it once its source is there), none on one raised as
    final for a person (a refused deletion, a source changed after filing, an unknown
    package)."""
    errors = [record.dagster_event.step_failure_data.error
              for record in instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE)
              if record.dagster_event is not None]
    return bool(errors) and all(error is not None and (
        error.cls_name == "RetryRequestedFromPolicy" or _partition_deleted(error)
        or _not_ready(error)) for error in errors)


def _not_ready(error: SerializableErrorInfo) -> bool:
    """A step's Failure raised from replicas.NotReady (common.planned, the placement IO
    manager): the copy waited for a source copy that was not there yet."""
    cause = error.cause
    return (error.cls_name == "Failure" and cause is not None
            and cause.cls_name == NotReady.__name__)


def _partition_deleted(error: SerializableErrorInfo) -> bool:
    return (error.cls_name == "DagsterInvalidInvocationError"
            and "Nonexistent partition keys" in error.message)


def _reconstructable(job: JobDefinition) -> ReconstructableJob:
    return ReconstructableRepository.for_module(
        "ccat_assets.definitions", "defs").get_reconstructable_job(job.name)


def _ui_origin(job: str) -> RemoteJobOrigin:
    """Where the webserver (workspace.yaml) finds the job: a run's Re-execute in the UI
    looks its job up there."""
    location = ManagedGrpcPythonEnvCodeLocationOrigin(LoadableTargetOrigin(
        executable_path=sys.executable, module_name="ccat_assets.definitions", attribute="defs"))
    return RemoteJobOrigin(RemoteRepositoryOrigin(location, SINGLETON_REPOSITORY_NAME), job)


# The in-process job a run of each job executes, made once per job: making it anew for every
# run (as execute_in_process does) threw away its snapshot, which Dagster then built, serialized
# and hashed again for every run created (~18% of creating a run, in the drive's tick).
_EPHEMERAL: weakref.WeakKeyDictionary[JobDefinition, JobDefinition] = weakref.WeakKeyDictionary()


def _ephemeral(job: JobDefinition) -> JobDefinition:
    """`job` as execute_in_process runs it (no resources or inputs added), kept per job."""
    made = _EPHEMERAL.get(job)
    if made is None:
        made = _EPHEMERAL[job] = job.as_ephemeral_job(resource_defs={}, input_values={})
    return made


def _create(job: JobDefinition, instance: DagsterInstance, partition_key: str | None,
            run_config: dict[str, Any], tags: dict[str, str]) -> tuple[DagsterRun, IJob]:
    """A run of `job`, created in the instance (NOT_STARTED) with the UI's origin of its job
    (so that Re-execute works on it), and what execute_run executes it with: the run
    execute_in_process makes (the in-process executor, partition tags) or, under Celery, the
    one execute_job makes of the reconstructable job."""
    if job.executor_def.name == "in_process":
        ephemeral = _ephemeral(job)
        runnable: IJob = InMemoryJob(ephemeral)
        run_tags = merge_run_tags(job_def=job, partition_key=partition_key, tags=tags,
                                  asset_selection=[], instance=instance, run_config=run_config)
        plan = create_execution_plan(
            runnable, run_config=run_config,
            instance_ref=instance.get_ref() if instance.is_persistent else None)
        run = instance.create_run_for_job(
            job_def=ephemeral, run_config=run_config, tags={**ephemeral.run_tags, **run_tags},
            asset_selection=frozenset(), execution_plan=plan,
            remote_job_origin=_ui_origin(job.name))
        return run, runnable
    whole = _reconstructable(job)
    if (selection := job.asset_selection_data) is not None:  # a subset (checks alone)
        whole = whole.get_subset(asset_selection=selection.asset_selection,
                                 asset_check_selection=selection.asset_check_selection)
    recon, load_data = _job_with_repository_load_data(whole)
    assert isinstance(recon, ReconstructableJob)
    definition = recon.get_definition()
    run = instance.create_run_for_job(
        job_def=definition, run_config=run_config, tags={**definition.run_tags, **tags},
        job_code_origin=recon.get_python_origin(), repository_load_data=load_data,
        remote_job_origin=_ui_origin(job.name))
    return run, recon

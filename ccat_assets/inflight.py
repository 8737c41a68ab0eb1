"""What runs are queued or running now, whoever launched them (a backfill, the UI, another
sensor): the sensors ask for no second run of a partition in flight, and the purge deletes
nothing of a package a run in flight may be reading.

A run whose process died (kill -9, a reboot) stays STARTED in the instance for ever: Dagster's
run monitoring cannot tell, as the DefaultRunLauncher does no worker health check, and
`dagster asset materialize` has no launcher at all. So every run records the process that
executes it as it starts (`record_worker`, called by the executors: host, pid, and what tells
that process from a later one with the same pid), and a run whose process is provably gone
is marked failed where it is seen (`close_if_dead`: by `in_flight`, so by every sensor, under
the daemon as under `ccat-dt drive`), never counted as in flight: the re-attempt sensor then
requests its work again, and the recovery finishes what it left half done. A run on another
host (or pid namespace) cannot be checked from here and is left alone; so is one whose process
runs, however long."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    RunRecord,
    RunRequest,
    RunsFilter,
)
from dagster._core.storage.dagster_run import FINISHED_STATUSES, NOT_FINISHED_STATUSES
from dagster._core.storage.tags import PARTITION_NAME_TAG
from dagster._time import get_current_datetime

from ccat_assets.routing import checks_alone, partition_of, stages_of
from ccat_assets.stages import stages_of_job
from ccat_assets.tags import DRIVE_TAG, WORKER_ID_TAG, WORKER_TAG
from ccat_dt.stages import Stage

LOG = logging.getLogger(__name__)

# A run in one of these has not ended (a run whose process died stays in one until closed).
IN_FLIGHT = [DagsterRunStatus.NOT_STARTED, DagsterRunStatus.QUEUED, DagsterRunStatus.STARTING,
             DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]

# Runs in flight are bounded by the run queue (max_concurrent_runs plus what waits); this
# caps one sensor tick's look at them.
LIMIT = 5000
LATER = 20  # later finished runs of a partition looked at for one of the same work
# The UI's "Force termination" marks a run CANCELED at once and tells no process: a run
# canceled this recently (the newest FORCED_LOOK) whose process still executes it is stopped.
FORCED_WITHIN = timedelta(days=1)
FORCED_LOOK = 100
# What the process executing a run writes as the run ends (a forced cancel's own
# RUN_CANCELED is written by the webserver, with no process of the run's).
RUN_ENDED = {DagsterEventType.RUN_SUCCESS, DagsterEventType.RUN_FAILURE,
             DagsterEventType.RUN_CANCELED}

UNKNOWN = "-"  # a part of the worker's identity this system does not show (no /proc)
RECORDED = ("machine", "namespace", "boot", "start")  # the parts of that identity


def in_flight(instance: DagsterInstance, *, checks: bool = True
              ) -> set[tuple[Stage, str, str | None]]:
    """(stage, package, site) of every queued or running lifecycle run (each stage of a run
    that does several); with `checks=False`, not of a run of checks alone (the integrity
    sensor's recheck of a partition, the Checks tab's "Execute"): it reads the work, it does
    not do it. Asked so whether a run does a partition's work (the lifecycle sensors,
    `ccat-dt retry`): before, such a run passed the work over, and the sensor's cursor moved
    on past it (the work waited for the hourly sweep for unattended work). A run whose
    process is gone is marked failed on the way (close_if_dead) and does not count. A run
    that a later run of the same work outlived (one of its stages, the same partition,
    created after it and finished) counts as dead: its process was killed and `ccat-dt
    retry` did its work again. A later run of another stage of the partition (the
    UI's "Materialize" of a package's purge_status while it is being built) proves nothing.
    A run an operator terminated whose process on this host goes on is interrupted
    (stop_if_terminated), a forced one's (CANCELED at once) included."""
    out: set[tuple[Stage, str, str | None]] = set()
    for record in instance.get_run_records(RunsFilter(statuses=list(NOT_FINISHED_STATUSES)),
                                           limit=LIMIT):
        run = record.dagster_run
        stages, partition = stages_of(run), partition_of(run.tags)
        if not stages or partition is None or PARTITION_NAME_TAG not in run.tags:
            continue
        if close_if_dead(instance, record):
            continue  # its process is gone: marked failed, its work re-attempted
        stop_if_terminated(instance, run)
        if not checks and checks_alone(instance, run):
            continue
        later = instance.get_runs(RunsFilter(
            tags={PARTITION_NAME_TAG: run.tags[PARTITION_NAME_TAG]},
            statuses=list(FINISHED_STATUSES), created_after=record.create_timestamp),
            limit=LATER)
        if not any(set(stages_of(other)) & set(stages) for other in later):
            out.update((stage, *partition) for stage in stages)
    for record in instance.get_run_records(RunsFilter(
            statuses=[DagsterRunStatus.CANCELED],
            updated_after=get_current_datetime() - FORCED_WITHIN), limit=FORCED_LOOK):
        stop_if_terminated(instance, record.dagster_run)  # a "Force termination" goes on
    return out


def not_in_flight(instance: DagsterInstance, requests: Sequence[RunRequest],
                  default_stage: Stage | None = None) -> list[RunRequest]:
    """The requests whose partition has no run in flight for any of the stages they do (a
    request without a job name is for `default_stage`, its sensor's job)."""
    if not requests:
        return []  # the runs in flight are not looked at (a query per run) for nothing
    busy = in_flight(instance, checks=False)
    if not busy:
        return list(requests)
    kept = []
    for request in requests:
        stages = stages_of_job(request.job_name) or (default_stage,)
        key = str(request.partition_key or "")
        package, _, site = key.partition("|")
        if not any((stage, package, site or None) in busy for stage in stages):
            kept.append(request)
    return kept


def packages_in_flight(instance: DagsterInstance) -> set[str]:
    """Packages whose copies a run in flight may be reading (site and LTA copies) or deleting
    (a purge): the purge plans nothing for them until that run ended."""
    return {package for stage, package, _ in in_flight(instance)
            if stage in (Stage.SITE_COPY, Stage.LTA_COPY, Stage.PURGE)}


# -- the process executing a run ------------------------------------------------------------

@dataclass(frozen=True)
class Liveness:
    """What became of a run's process: `alive` True or False, or None where this process
    cannot tell (another host or pid namespace, nothing recorded); `why` says so in words."""

    alive: bool | None
    why: str


def record_worker(instance: DagsterInstance, run: DagsterRun) -> None:
    """Tag the run with this process, its run worker (called as the run starts, by the
    executors: routing._routed). Never keeps a run from starting."""
    try:
        worker, identity = this_process()
        instance.add_run_tags(run.run_id, {WORKER_TAG: worker, WORKER_ID_TAG: identity})
    except Exception as exc:  # noqa: BLE001 - the run goes on; it is only not checkable
        LOG.warning("run %s: its process not recorded: %s", run.run_id, exc)


def this_process() -> tuple[str, str]:
    """("host:pid", "machine=… namespace=… boot=… start=…") of this process: how a run's
    worker (record_worker) or the Dagster daemon (sqlite_storage) is recorded, so that
    process_liveness can tell later whether it still runs."""
    return (f"{socket.gethostname()}:{os.getpid()}",
            " ".join(f"{key}={value or UNKNOWN}" for key, value in _identity(os.getpid()).items()
                     if key in RECORDED))


def liveness(run: DagsterRun) -> Liveness:
    """Whether the process recorded as executing the run (record_worker) still runs."""
    return process_liveness(run.tags.get(WORKER_TAG, ""), run.tags.get(WORKER_ID_TAG, ""))


def process_liveness(worker: str, recorded: str) -> Liveness:
    """Whether the process recorded as `worker` ("host:pid") with the identity `recorded`
    (this_process) still runs. Only on its own machine and pid namespace can that be told;
    there, a process that is gone, a zombie, one from before a restart of the machine, or
    another process under its pid means it is gone."""
    host, _, number = worker.rpartition(":")
    if not host or not number.isdigit():
        return Liveness(None, "no process recorded for it (launched elsewhere, or before "
                              "ccat-dt recorded runs' processes)")
    pid = int(number)
    then = dict(part.partition("=")[::2] for part in recorded.split())
    now = _identity(pid)
    known = {key: (then.get(key, UNKNOWN), now[key] or UNKNOWN) for key in RECORDED}
    if host != socket.gethostname() or (
            UNKNOWN not in known["machine"] and len(set(known["machine"])) > 1):
        return Liveness(None, f"its process {worker} is on another machine")
    if known["namespace"][0] != known["namespace"][1]:  # the same if neither is known
        return Liveness(None, f"its process {worker} is in another container")
    if UNKNOWN not in known["boot"] and len(set(known["boot"])) > 1:
        if UNKNOWN in known["machine"]:
            return Liveness(None, f"its process {worker} is on another machine of that name, "
                                  "or on this one before it restarted")
        return Liveness(False, f"its process {pid} on {host} is gone (the machine restarted "
                               "since)")
    if os.path.isdir("/proc/self"):
        if now["state"] in ("", "Z", "X"):  # a zombie is dead, only not yet reaped
            return Liveness(False, f"its process {pid} on {host} is gone")
        if UNKNOWN not in known["start"] and len(set(known["start"])) > 1:
            return Liveness(False, f"its process {pid} on {host} is gone (pid {pid} is "
                                   "another process now)")
        return Liveness(True, f"its process {pid} on {host} runs")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return Liveness(False, f"its process {pid} on {host} is gone")
    except PermissionError:
        pass
    return Liveness(True, f"its process {pid} on {host} runs")


def why_dead(instance: DagsterInstance, record: RunRecord,
             now: datetime | None = None) -> str | None:
    """Why a run that has not ended never will, or None while it may: a started (or canceling)
    run whose process is gone; a run created or launched longer ago than the instance's run
    start timeout (`run_monitoring.start_timeout_seconds`) that never started, unless a drive
    created it (it waits in that drive's queue; close_dead_runs is for a dead drive's). A
    QUEUED run waits for whoever dequeues (the daemon, or `ccat-dt drive` without one)."""
    run = record.dagster_run
    if run.status in (DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING):
        state = liveness(run)
        return state.why if state.alive is False else None
    if run.status in (DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING) \
            and not run.tags.get(DRIVE_TAG):
        idle = ((now or get_current_datetime()) - record.update_timestamp).total_seconds()
        if idle > instance.run_monitoring_start_timeout_seconds:
            how = "created" if run.status == DagsterRunStatus.NOT_STARTED else "launched"
            return (f"it was {how} {idle / 60:.0f} min ago and never started: the process "
                    "that was to execute it is gone")
    return None


def close_if_dead(instance: DagsterInstance, record: RunRecord,
                  now: datetime | None = None) -> str | None:
    """Mark the run failed (canceled, if it was being canceled) when it never ends (why_dead),
    with the reason in its event log, so that the re-attempt sensor takes its work; the reason,
    or None (the run left as it is)."""
    why = why_dead(instance, record, now)
    if why is None:
        return None
    run = instance.get_run_by_id(record.dagster_run.run_id)
    if run is None or run.status != record.dagster_run.status:
        return None  # it moved on meanwhile (ended, or was started): judged again next time
    if run.status == DagsterRunStatus.CANCELING:
        message = f"ccat-dt: {why}; marked canceled"
        instance.report_run_canceled(run, message=message)
    else:
        message = f"ccat-dt: {why}; marked failed, so that its work is re-attempted"
        instance.report_run_failed(run, message=message)
    LOG.warning("run %s: %s", run.run_id, message)
    return why


def stop_if_terminated(instance: DagsterInstance, run: DagsterRun) -> bool:
    """Interrupt the process executing a run an operator terminated (the UI's Terminate: the
    run CANCELING; its "Force termination": CANCELED at once), if it runs on this host:
    Dagster tells only the run workers its launcher started, and a forced one none, so a
    `dagster asset materialize` (or a drive's run) went on. Interrupted, the run ends CANCELED
    and its work is re-attempted after the back-off. In a thread, again every STOP_EVERY_S
    while the run is being terminated, for STOP_FOR_S at most (one interrupt ends a run
    whose steps execute in its process: no step is retried after it, ccat_assets/interrupts.py;
    the others are a safeguard).
    True if the process is being stopped."""
    if run.status not in (DagsterRunStatus.CANCELING, DagsterRunStatus.CANCELED) \
            or liveness(run).alive is not True:
        return False
    pid = int(run.tags[WORKER_TAG].rpartition(":")[2])
    if pid == os.getpid():  # a run this process executes itself: not from within
        return False
    if not _same_process(run, pid):  # a signal only where the pid is known to be its process
        return False
    if not _executes(instance, run, pid):
        return False
    with _STOPPING_LOCK:
        if run.run_id in _STOPPING:
            return True
        _STOPPING.add(run.run_id)
    LOG.warning("run %s: terminated by an operator; interrupting its process %d", run.run_id, pid)
    threading.Thread(target=_interrupt, args=(instance, run.run_id, pid), daemon=True,
                     name=f"stop-{run.run_id[:8]}").start()
    return True


STOP_EVERY_S = 0.5
STOP_FOR_S = 30.0
_STOPPING: set[str] = set()  # runs whose process a thread is interrupting
_STOPPING_LOCK = threading.Lock()


def _executes(instance: DagsterInstance, run: DagsterRun, pid: int) -> bool:
    """Whether process `pid` still executes the terminated run: CANCELING, or CANCELED (forced)
    with no end of the run written by that process. A run a drive executes in its own process
    is not: the drive stops it (runpool), and the process goes on to its other runs."""
    if run.status == DagsterRunStatus.CANCELING:
        return True
    if run.status != DagsterRunStatus.CANCELED or run.tags.get(WORKER_TAG) == run.tags.get(
            DRIVE_TAG):
        return False
    ended = instance.get_records_for_run(run.run_id, of_type=RUN_ENDED).records
    return not any(r.event_log_entry.dagster_event is not None
                   and r.event_log_entry.dagster_event.pid == pid for r in ended)


def in_a_live_drives_pool(instance: DagsterInstance, run: DagsterRun) -> bool:
    """Whether the run executes in a child process of the live `ccat-dt drive` that claimed it
    (DRIVE_TAG; its pool, runpool.py), which interrupts it once it is CANCELING (RunPool.
    cancel_terminated): the process that started it (its RUN_START event's pid) runs on this
    host and its parent is that drive. Not a run a drive executes in its own process (only a
    profiler or a test asks for that, `drive(in_process=True)`: nothing interrupts it there),
    nor one whose drive is gone (its children are then another's), nor one that has not
    started."""
    host, _, number = run.tags.get(DRIVE_TAG, "").rpartition(":")
    if host != socket.gethostname() or not number.isdigit():
        return False
    drive = int(number)
    started = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.RUN_START,
                                           limit=1).records
    pids = {record.event_log_entry.dagster_event.pid for record in started
            if record.event_log_entry.dagster_event is not None}
    return any(pid is not None and pid != drive and (stat := _stat(pid)) is not None
               and stat[0] not in ("Z", "X") and stat[2] == drive for pid in pids)


def _same_process(run: DagsterRun, pid: int) -> bool:
    """Whether `pid` is provably the process recorded for the run: its start time in this
    boot, as recorded, is the one /proc shows now (not judged where either is unknown)."""
    then = dict(part.partition("=")[::2] for part in run.tags.get(WORKER_ID_TAG, "").split())
    start = _identity(pid)["start"]
    return bool(start) and then.get("start") == start


def _interrupt(instance: DagsterInstance, run_id: str, pid: int) -> None:
    try:
        deadline = time.monotonic() + STOP_FOR_S
        while time.monotonic() < deadline:
            run = instance.get_run_by_id(run_id)
            if run is None or liveness(run).alive is not True or not _same_process(run, pid) \
                    or not _executes(instance, run, pid):
                return
            os.kill(pid, signal.SIGTERM)
            time.sleep(STOP_EVERY_S)
    except Exception as exc:  # noqa: BLE001 - a thread's failure must not pass unseen
        LOG.warning("run %s: interrupting its process %d failed: %s", run_id, pid, exc)
    finally:
        with _STOPPING_LOCK:
            _STOPPING.discard(run_id)


def _identity(pid: int) -> dict[str, str]:
    """What tells process `pid` from every other process ("" where this system does not
    show it): its machine (machine-id: stable across restarts), its pid namespace (a
    container), this boot of the machine, and when it started in this boot (clock ticks: a
    later process under the same pid started later); `state` is not recorded ("" when there
    is no such process)."""
    stat = _stat(pid)
    return {"machine": _read("/etc/machine-id"), "namespace": _namespace(),
            "boot": _read("/proc/sys/kernel/random/boot_id"),
            "start": str(stat[1]) if stat else "", "state": stat[0] if stat else ""}


@cache
def _namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@cache
def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, start time in clock ticks after boot, parent's pid) of a process, None
    without one."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19]), int(fields[1])
    except (OSError, IndexError, ValueError):
        return None

"""A drive's runs side by side: each run executes in a forked child process, at most
`workers` at once and, per tag, at most the instance's tag concurrency limit (one per link,
`routes[].max_concurrent`): the limits the daemon's run queue applies (dagster.yaml,
`concurrency.runs`), so that the disks, not one core, bound a drive.

Fork, not spawn: a child starts in milliseconds with everything the drive imported (and a
test's monkeypatches). The drive creates each run in the instance before it waits here, so the
run-key dedupe and the sensors' in-flight checks see it at once. A child that dies (kill -9, a
segfault) leaves its run in flight; the pool marks it failed when it sees the child's exit, so
that the re-attempt sensor takes it. Every run waiting here is QUEUED, the
drive's own as those others queued (the UI, a backfill), and made the drive's (STARTING:
`claim`) only as it starts: Dagster cancels a QUEUED run (the UI's Terminate, a backfill's
Cancel), neither a NOT_STARTED nor a STARTING one. Whatever waits here is looked at again
as it starts: a run terminated, deleted or dequeued by another meanwhile is not executed. A
drive killed with SIGKILL leaves its children to finish their runs: they hold the drive lock
(its file descriptor is inherited), so the next drive starts after them and closes whatever
they left in flight; the runs left waiting here are still QUEUED, and the next drive (or a
daemon) executes them as any queued run."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from multiprocessing.connection import wait as wait_for_any
from typing import Any, NoReturn

from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter
from dagster._core.definitions.job_base import IJob
from dagster._core.errors import DagsterRunNotFoundError
from dagster._core.execution.api import execute_run
from dagster._utils.interrupts import capture_interrupts
from dagster._utils.tags import TagConcurrencyLimitsCounter

from ccat_assets.inflight import IN_FLIGHT, record_worker
from ccat_assets.interrupts import INTERRUPTED, INTERRUPTS, stopped_by_no_person

TERMINATE_GRACE_S = 10.0  # after SIGTERM, a child is given this long before SIGKILL
RESIGNAL_S = 0.5  # SIGTERM again this often meanwhile (see RunPool.terminate)
CANCEL_POLL_S = 1.0  # while waiting, runs terminated by an operator are looked for this often
# A run an operator terminated: CANCELING, or CANCELED at once by the UI's "Force termination"
# (which only marks it: its process would go on, the work no longer counted as in flight).
TERMINATED = [DagsterRunStatus.CANCELING, DagsterRunStatus.CANCELED]
STOPPING = {signal.SIGINT, signal.SIGTERM}  # what interrupts a run (and the drive)
DRIVE_STOPPED = ("the drive executing it was stopped (Ctrl-C, SIGTERM): canceled by an "
                 "operator, no failed attempt; the next drive does its work")
DRIVE_STOPPED_QUEUED = "the drive was stopped (Ctrl-C, SIGTERM) before the run started"


def run_limits(instance: DagsterInstance) -> tuple[int, list[Mapping[str, Any]]]:
    """Runs at once and the tag concurrency limits of the instance's run queue; an instance
    without a run queue runs one at a time. Dagster's -1 (no limit) is no limit."""
    queue = instance.get_concurrency_config().run_queue_config
    if queue is None:
        return 1, []
    most = queue.max_concurrent_runs
    return (sys.maxsize if most < 0 else max(1, most)), list(queue.tag_concurrency_limits)


@dataclass(frozen=True)
class Queued:
    key: str  # what the drive reports the run as (its run key, or its job's name)
    run: DagsterRun  # in the instance, QUEUED: left so until it starts (`claim`), so that
    # Dagster's Terminate and a backfill's Cancel stop it meanwhile
    job: IJob  # what execute_run executes: the in-memory job, or the reconstructable one
    adopted: bool = False  # a run others queued (the UI, a backfill), not the drive's own:
    # left QUEUED if the drive stops before it starts (`terminate`)


@dataclass(frozen=True)
class Finished:
    key: str
    ok: bool
    run_id: str = ""
    deleted: bool = False  # the run was deleted (the UI's Delete): not executed, if queued
    canceled: bool = False  # terminated while queued (the UI's Terminate, a backfill's
    # Cancel): not executed
    taken: str = ""  # the status of a queued run another took meanwhile (a Dagster daemon):
    # not executed
    terminated: bool = False  # ended CANCELED once claimed or started: an operator's
    # Terminate (or Force termination) of a run in flight; not a failure of its work
    stopped: bool = False  # ended because the drive was stopped (Ctrl-C, SIGTERM): canceled
    # or terminated for that, not in the UI


@dataclass(frozen=True)
class _Child:
    queued: Queued
    pid: int


class RunPool:
    """Queued runs, started in order as the limits allow, and the children executing them."""

    def __init__(self, instance: DagsterInstance, workers: int,
                 tag_limits: Sequence[Mapping[str, Any]],
                 route: Callable[[DagsterRun], DagsterRun] = lambda run: run,
                 claim: Callable[[DagsterRun], DagsterRun | None] = lambda run: run) -> None:
        """`route`: a run's tags made current as it is about to start (routing.reroute).
        `claim`: a queued run made the drive's as it starts (STARTING), or None if it is
        queued no more or left to a Dagster daemon."""
        self.instance, self.workers, self.tag_limits = instance, workers, list(tag_limits)
        self.route, self.claim = route, claim
        self.queue: deque[Queued] = deque()
        self.children: dict[int, _Child] = {}  # by the read end of a pipe only it writes to
        self.dropped: list[Finished] = []  # queued runs not executed (drop_stopped), not yet
        # reported
        self.started: set[str] = set()  # children's runs seen started (_terminated)
        self.unreported: list[Finished] = []  # children reaped, not yet returned (by `wait`,
        # or by `terminate`: an interrupt that came meanwhile loses none)

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.children or self.dropped or self.unreported)

    def submit(self, queued: Queued) -> None:
        self.queue.append(queued)
        self._start_ready()

    def wait(self, timeout: float | None = None) -> list[Finished]:
        """Block until a child exits (or `timeout` passed); the runs that ended. Queued runs
        the limits now allow are started. Meanwhile a run an operator terminated (the UI's
        Terminate: the run CANCELING) is interrupted (cancel_terminated), and one terminated
        or deleted while it waits is dropped (drop_stopped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            finished = self._reap(CANCEL_POLL_S if left is None
                                  else max(0.0, min(left, CANCEL_POLL_S)))
            if finished or not self.children or (left is not None and left <= CANCEL_POLL_S):
                break
            self.cancel_terminated()
            self.drop_stopped()
            if self.dropped:
                break
        self._start_ready()
        finished, self.unreported, self.dropped = self.unreported + self.dropped, [], []
        return finished

    def cancel_terminated(self) -> list[str]:
        """SIGTERM each child whose run an operator terminated (TERMINATED), as Dagster's run
        launcher would its run worker: the UI's Terminate on a run the drive executes marks it
        CANCELING and sends nothing (no launcher launched it), so the run would go on. The
        interrupted run ends CANCELED, its step not retried (ccat_assets/interrupts.py), and
        its work is asked for again after the back-off, no failed attempt of it
        (ccat_dt/reattempt.py). Again at each
        call while the child runs, a safeguard. Returns their run ids.

        Only once the run's start is written: a run terminated as it was starting (STARTING,
        the UI's dialog then sends "Force termination") is not started by its child if the
        child sees it so (_terminated_before_start); one the child started all the same
        (terminated after that look) is STARTED again by its start, over the operator's mark.
        It is marked again, and interrupted, the first time it is seen started. Before, the
        signal came before the start: the run failed, or went on to its end."""
        by_run = {child.queued.run.run_id: child for child in self.children.values()}
        if not by_run:
            return []
        try:
            terminated = [run for run in self.instance.get_runs(RunsFilter(
                run_ids=list(by_run))) if self._terminated(run)]
        except Exception:  # noqa: BLE001 - the run storage busy: looked at again next time
            return []
        for run in terminated:
            with suppress(ProcessLookupError):
                os.kill(by_run[run.run_id].pid, signal.SIGTERM)
        return [run.run_id for run in terminated]

    def _terminated(self, run: DagsterRun) -> bool:
        """Whether the child executing `run` is to be interrupted (cancel_terminated)."""
        if run.run_id not in self.started:
            if run.status == DagsterRunStatus.STARTED:
                self.started.add(run.run_id)
                return self._marked_again(run)
            if run.status not in TERMINATED or not self.instance.get_records_for_run(
                    run.run_id, of_type=DagsterEventType.RUN_START, limit=1).records:
                return False  # not started (yet): see above
            self.started.add(run.run_id)
        return run.status in TERMINATED

    def _marked_again(self, run: DagsterRun) -> bool:
        """A run just seen STARTED that was terminated before its start was written (a cancel
        in its log) marked again as the operator did: CANCELING, or CANCELED ("Force
        termination"). Whether it was."""
        cancels = self.instance.get_records_for_run(
            run.run_id, of_type={DagsterEventType.RUN_CANCELING, DagsterEventType.RUN_CANCELED},
            ascending=False, limit=1).records
        if not cancels:
            return False
        why = "terminated as it was starting; interrupted once started"
        event = cancels[0].event_log_entry.dagster_event
        if event is not None and event.event_type == DagsterEventType.RUN_CANCELED:
            self.instance.report_run_canceled(run, message=why)
        else:
            self.instance.report_run_canceling(run, message=why)
        return True

    def drop_stopped(self) -> None:
        """Drop each queued run an operator stopped while it waited (terminated, deleted) or
        that another dequeued (a Dagster daemon started meanwhile): reported at once (the
        drive's line), not when its link is free; the check as it starts is the guarantee."""
        if not self.queue:
            return
        try:
            runs = {run.run_id: run for run in self.instance.get_runs(RunsFilter(
                run_ids=[queued.run.run_id for queued in self.queue]))}
        except Exception:  # noqa: BLE001 - the run storage busy: looked at again next time
            return
        for queued in list(self.queue):
            if (why := self._stopped(queued, runs.get(queued.run.run_id))) is not None:
                self.queue.remove(queued)
                self.dropped.append(why)

    def terminate(self) -> list[Finished]:
        """SIGTERM every child (SIGKILL after TERMINATE_GRACE_S) and wait for them, their runs
        first marked as an operator's cancel (`_mark_stopped`); runs still queued are marked
        CANCELED (never started), but for those adopted from Dagster's queue: left QUEUED,
        never this drive's, for the next drive or the daemon.

        SIGTERM again every RESIGNAL_S, a safeguard: one interrupt ends the run, its step not
        retried (ccat_assets/interrupts.py; before, Dagster's retry policy re-ran the step a
        few seconds later unless another signal came first). Not SIGKILL at once: it would
        leave the step's rsync or bbcp running, in its own process group."""
        deadline = time.monotonic() + TERMINATE_GRACE_S
        for child in self.children.values():  # an operator's cancel, before the signal
            self._mark_stopped(child.queued.run)
        while self.children:
            left = deadline - time.monotonic()
            for child in self.children.values():
                with suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM if left > 0 else signal.SIGKILL)
            self._reap(min(max(left, 0.1), RESIGNAL_S))
        finished = [self._canceled_if_interrupted(done) for done in self.unreported]
        self.unreported = []
        while self.queue:
            queued = self.queue.popleft()
            if not queued.adopted:
                with suppress(Exception):  # the run storage busy: left QUEUED, for the next
                    run = self.instance.get_run_by_id(queued.run.run_id)  # drive
                    if run is not None and run.status == DagsterRunStatus.QUEUED:
                        stopped_by_no_person(self.instance, run.run_id, "drive")
                        self.instance.report_run_canceled(run, message=DRIVE_STOPPED_QUEUED)
                finished.append(Finished(queued.key, ok=False, run_id=queued.run.run_id,
                                         canceled=True, stopped=True))
        return [replace(done, stopped=True) for done in finished]

    def _canceled_if_interrupted(self, done: Finished) -> Finished:
        """A run that ended FAILURE as the drive was stopped, for the interrupt (the terminal's
        Ctrl-C reaches the drive's children with the drive, as it is their process group:
        one may fail its run before the drive marks it), marked CANCELED as the others."""
        if done.ok or done.terminated or done.deleted or not done.run_id:
            return done
        with suppress(Exception):  # the run storage busy: it stays FAILURE, as before
            run = self.instance.get_run_by_id(done.run_id)
            if run is not None and run.status == DagsterRunStatus.FAILURE and any(
                    _interrupt(record.event_log_entry.dagster_event)
                    for record in self.instance.get_records_for_run(
                        run.run_id, of_type={DagsterEventType.STEP_FAILURE,
                                             DagsterEventType.RUN_FAILURE}).records):
                stopped_by_no_person(self.instance, run.run_id, "drive")
                self.instance.report_run_canceled(run, message=DRIVE_STOPPED)
                return replace(done, terminated=True)
        return done

    def _mark_stopped(self, run: DagsterRun) -> None:
        """The run of a child about to be interrupted because the drive was stopped (Ctrl-C,
        SIGTERM: an operator's doing) marked CANCELING, as the UI's Terminate marks it: the
        interrupted run then ends CANCELED, not FAILURE (Dagster's verdict for a run being
        terminated; `_outcome` for one interrupted before its start was written), so it is no
        failed attempt of its work (ccat_dt/reattempt.py: never escalated, a person never
        told for it), and the next drive asks for its work again after the back-off. Before,
        each was marked failed, a failed attempt that led to an escalation. Tagged as stopped
        by no person first (interrupts.stopped_by_no_person), unless an operator's Terminate
        came before (CANCELING already): the same work stopped so at every drive (a drive
        under `timeout`, a nightly shutdown) is told to a person past the horizon."""
        with suppress(Exception):  # the run storage busy: the run ends FAILURE, as before
            now = self.instance.get_run_by_id(run.run_id)
            if now is not None and now.status in IN_FLIGHT and now.status not in TERMINATED:
                stopped_by_no_person(self.instance, now.run_id, "drive")
                self.instance.report_run_canceling(now, message=DRIVE_STOPPED)

    def _start_ready(self) -> None:
        """Start the queued runs the limits allow, in order. A run the limits would start is
        routed again first (`route`): its link may have changed while it waited (a backfill's
        copy submitted before any archive held the package had none), and it is judged by the
        link it loads now. Later runs on other links may start past a blocked one, as in the
        daemon's queue."""
        running = [child.queued.run for child in self.children.values()]
        counter = TagConcurrencyLimitsCounter(self.tag_limits, running)
        index = 0
        while index < len(self.queue):
            if len(self.children) >= self.workers:
                return
            queued = self.queue[index]
            if not counter.is_blocked(queued.run):
                routed = self._routed(queued)
                if isinstance(routed, Finished):
                    del self.queue[index]
                    self.dropped.append(routed)
                    continue
                queued = self.queue[index] = routed
                if not counter.is_blocked(queued.run):
                    del self.queue[index]
                    claimed = self._claimed(queued)
                    if isinstance(claimed, Finished):
                        self.dropped.append(claimed)
                        continue
                    self._start(claimed)
                    counter.update_counters_with_launched_item(claimed.run)
                    continue
            index += 1
        if self.queue and not self.children:  # a tag limit of 0: never startable
            for queued in self.queue:
                self._fail(queued.run, "a tag concurrency limit of 0 in dagster.yaml blocks it")
            self.queue.clear()

    def _routed(self, queued: Queued) -> Queued | Finished:
        """The queued run about to start as it is now, routed again; or, not to be executed,
        why (_stopped). Before, a run deleted while it waited (the UI's Delete on a run "not
        started") raised DagsterRunNotFoundError as it was routed, which stopped the drive
        and interrupted every run it was executing."""
        try:
            run = self.instance.get_run_by_id(queued.run.run_id)
            if (why := self._stopped(queued, run)) is not None:
                return why
            assert run is not None
            return replace(queued, run=self.route(run))
        except DagsterRunNotFoundError:
            return Finished(queued.key, ok=False, run_id=queued.run.run_id, deleted=True)

    def _claimed(self, queued: Queued) -> Queued | Finished:
        """A queued run made the drive's as it starts (`claim`: STARTING), if it is still
        QUEUED: until then Dagster's own cancel paths stop it. One `claim` refuses while it
        is still QUEUED is left to the daemon (one runs now: it dequeues it; the drive must
        not start it as well). Before, the drive's own runs waited NOT_STARTED, which the
        UI's Terminate refuses: they were executed all the same."""
        try:
            if (claimed := self.claim(queued.run)) is not None:
                return replace(queued, run=claimed)
            run = self.instance.get_run_by_id(queued.run.run_id)
        except DagsterRunNotFoundError:
            run = None
        return self._stopped(queued, run) or Finished(
            queued.key, ok=False, run_id=queued.run.run_id, taken=DagsterRunStatus.QUEUED.value)

    def _stopped(self, queued: Queued, run: DagsterRun | None) -> Finished | None:
        """Why the queued run (`run`: as it is now) must not be executed, if so: deleted (as
        the daemon executes no deleted run); terminated by an operator (the UI's Terminate or
        Force termination, a backfill's Cancel), marked CANCELED if it was CANCELING; no
        longer waiting to be started (dequeued by a Dagster daemon started meanwhile)."""
        run_id = queued.run.run_id
        if run is None:
            return Finished(queued.key, ok=False, run_id=run_id, deleted=True)
        if run.status in TERMINATED:
            if run.status == DagsterRunStatus.CANCELING:  # no process executes it
                self.instance.report_run_canceled(run, message="canceled before it started")
            return Finished(queued.key, ok=False, run_id=run_id, canceled=True)
        if run.status != DagsterRunStatus.QUEUED:
            return Finished(queued.key, ok=False, run_id=run_id, taken=run.status.value)
        return None

    def _start(self, queued: Queued) -> None:
        for stream in (sys.stdout, sys.stderr):  # or the child repeats what is buffered
            with suppress(Exception):
                stream.flush()
        read, write = os.pipe()  # not inherited by programs the run executes (O_CLOEXEC)
        # SIGINT and SIGTERM held until the child has its own handlers (_execute): one that
        # came in between (the run terminated as it started) ran the drive's in the child, a
        # KeyboardInterrupt through the drive's stack there
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOPPING)
        try:
            pid = os.fork()
            if pid == 0:
                os.close(read)
                _execute(queued, self.instance, mask)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(write)  # the child holds the only write end: EOF when it exits, however
        self.children[read] = _Child(queued, pid)

    def _reap(self, timeout: float | None) -> list[Finished]:
        if not self.children:
            return []
        finished = []
        for fd in wait_for_any(list(self.children), timeout):
            assert isinstance(fd, int)
            child = self.children.pop(fd)
            self.started.discard(child.queued.run.run_id)
            os.close(fd)
            _, status = os.waitpid(child.pid, 0)
            finished.append(self._outcome(child, os.waitstatus_to_exitcode(status)))
            self.unreported.append(finished[-1])
        return finished

    def _outcome(self, child: _Child, code: int) -> Finished:
        run = self.instance.get_run_by_id(child.queued.run.run_id)
        if run is not None and (run.status in IN_FLIGHT or run.status == DagsterRunStatus.FAILURE
                                ) and self._operator_terminated(run):
            # Interrupted for an operator's Terminate where Dagster does not end it CANCELED
            # itself: a "Force termination" before the run's start was written (its start made
            # it STARTED again), or while its resources were being set up. Past those points
            # Dagster ends a run so terminated CANCELED (a failure after the request included):
            # so does this, whatever the interrupt met.
            self.instance.report_run_canceled(
                run, message="terminated by an operator; interrupted as it was being started")
            run = self.instance.get_run_by_id(run.run_id)
        if run is not None and run.status in IN_FLIGHT:  # the child died with it
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            self._fail(run, f"the process executing the run ({child.pid}) ended ({how}) "
                            "before the run did")
            run = self.instance.get_run_by_id(run.run_id)
        ok = run is not None and run.status == DagsterRunStatus.SUCCESS
        return Finished(child.queued.key, ok, child.queued.run.run_id, deleted=run is None,
                        terminated=run is not None and run.status == DagsterRunStatus.CANCELED)

    def _operator_terminated(self, run: DagsterRun) -> bool:
        """Whether an operator terminated the run (its log holds the cancel they asked for)."""
        return bool(self.instance.get_records_for_run(
            run.run_id, of_type={DagsterEventType.RUN_CANCELING, DagsterEventType.RUN_CANCELED},
            limit=1).records)

    def _fail(self, run: DagsterRun, why: str) -> None:
        self.instance.report_run_failed(run, message=why)


def _interrupt(event: Any) -> bool:
    """Whether a step's (or run's) failure event is an interrupt's (interrupts.py)."""
    if event is None:
        return False
    data = event.event_specific_data
    error = getattr(data, "error", None)
    while error is not None:
        if error.cls_name in INTERRUPTS or INTERRUPTED in (error.message or ""):
            return True
        error = error.cause
    return False


def _terminated_before_start(instance: DagsterInstance, run: DagsterRun) -> bool:
    """In the child, about to start the run: whether an operator terminated it since it was
    claimed (STARTING; the UI's Terminate of a STARTING run is a "Force termination", which
    marks it CANCELED; a CANCELING one is marked CANCELED here). It is then not executed:
    Dagster's start would set it STARTED again, and execute it."""
    now = instance.get_run_by_id(run.run_id)
    if now is None or now.status not in TERMINATED:
        return False
    if now.status == DagsterRunStatus.CANCELING:
        instance.report_run_canceled(now, message="terminated before it started; not executed")
    return True


def _execute(queued: Queued, instance: DagsterInstance, mask: set[int]) -> NoReturn:
    """In the child: execute the run, then leave at once (os._exit), never through the
    parent's atexit handlers, pytest or finally blocks. SIGINT and SIGTERM interrupt the run
    as Dagster's run workers do (the run is marked failed), from the moment they are no longer
    held (`mask`: the drive's, before the fork). A run terminated as it was being started is
    not executed."""
    code = 2
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)  # the drive's (driver._Signals): its signals, not this run's
        with capture_interrupts():
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one held meanwhile: captured
            # This process executes the run: recorded on it (ccat/worker), as the routed
            # executors do for the runs they start, so that a run left in flight by this
            # child and its drive both gone (a machine stopped, a process group killed) is
            # closed by whoever looks next (inflight.close_if_dead: the daemon's sensors, a
            # drive), and a "Force termination" of it stops this process (stop_if_terminated)
            record_worker(instance, queued.run)
            code = (1 if _terminated_before_start(instance, queued.run)
                    else 0 if execute_run(queued.job, queued.run, instance).success else 1)
    except BaseException:  # noqa: BLE001 - reported by the run's status and this trace
        with suppress(Exception):
            traceback.print_exc()
    finally:
        for number in (signal.SIGINT, signal.SIGTERM):  # the drive's repeated SIGTERM must
            signal.signal(number, signal.SIG_IGN)  # not unwind this fork into its stack
        for stream in (sys.stdout, sys.stderr):
            with suppress(Exception):
                stream.flush()
        os._exit(code)

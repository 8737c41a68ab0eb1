"""A step sent to a Celery worker that was killed (SIGKILL, the OOM killer, a machine that
stopped) or restarted never gets a result: the message was acknowledged as the task started,
so nothing redelivers it, and dagster-celery's loop would wait for it for ever, the run
STARTED and its partition in flight (no sensor asks for it again, no person is told).

The worker records where it runs each task (`task_track_started`: its node name and pid,
celery_app.py); the run asks that worker every WATCH_EVERY_S whether it still runs the task.
One that answers without it, or does not answer for SILENT_FOR_S, has lost the step: the step
fails with the cause, the run fails, and the re-attempt sensor asks for the work again (the
claims of the dead process are taken over, its `.part` file replaced).

The broker itself may lose the step (Redis restarted empty, failed over to a replica that
lacked it, flushed): a message not yet taken, or the result of a step that finished, is gone,
and the step reads PENDING for ever (no worker recorded: nobody to ask). So each step sent
leaves a mark in the broker's (and the result backend's) Redis; a step still PENDING whose mark
is gone was lost by that Redis, unless a worker holds it (received, running): one that the
workers that answer do not hold at two looks in a row is failed (and revoked, should its
message turn up after all); the run fails and the re-attempt sensor asks for the work again.

Redis may also be unreachable for a while, its data kept (restarted, failed over, a network
blip): the step goes on at its worker, which stores its result once Redis is back
(celery_app.py). A run that cannot read its step's state waits for Redis up to
BROKER_OUTAGE_S (before, its first look failed it, and the re-attempt was sent beside the step
still running); longer, the run fails naming the broker. A run that sends a step meanwhile
waits as long to send it and to leave its mark (before, Celery's three tries in 0.6 s failed
the run: "OperationalError: ... Connection refused").

An operator's Terminate interrupts the run's process, and dagster-celery revokes its steps'
tasks; a revoke alone stops no task already executing, so the step went on to its end (a
transfer of hours), the run CANCELING meanwhile. The revoke now also terminates the task
(Celery's control API, broadcast to the workers wherever they run) with STOP_SIGNAL, which the
worker's pool process turns into an interrupt of the step (stoppable_steps): the step stops as
under the embedded executor (ccat_assets/interrupts.py: its temporary file removed, its claim
ended), and the run waits up to STOP_GRACE_S for the step's own end before it takes the task
for revoked, so that it ends CANCELED after its step, not beside it.

A step may also wait in a queue that no worker serves: no worker started for its site, or a
run that could not be routed (Celery's default queue, which no site worker serves). It read
PENDING for ever, its mark kept, nobody told. So a step still PENDING asks the workers which
queues they consume (Celery's inspect); one whose queue no answering worker has consumed for
UNSERVED_FOR_S fails, naming the queue and the worker to start, and is revoked."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any
from urllib.parse import urlsplit

LOG = logging.getLogger("ccat_assets.celery_watch")

WATCH_EVERY_S = 10.0
SILENT_FOR_S = 600.0  # a worker that does not answer for this long is taken for gone
SENT = "ccat-dt:sent:{}"  # the mark of a step sent, in each Redis that holds it
SENT_TTL_S = 30 * 24 * 3600  # beyond any wait in a queue (a run's max_runtime is two days)
GONE_LOOKS = 2  # looks in a row that find a PENDING step nowhere before it is taken for lost
BROKER_OUTAGE_S = 120.0  # Redis unreachable this long fails the waiting run; less is waited out
# Celery's own retry of a message it cannot send (kombu's ensure): once a second while a run
# waits for an unreachable Redis, not Celery's default of three tries in 0.6 s.
PUBLISH_RETRY_POLICY = {"max_retries": int(BROKER_OUTAGE_S), "interval_start": 0,
                        "interval_step": 1, "interval_max": 1}
STOP_SIGNAL = signal.SIGUSR2  # a Terminate's revoke sends it to the process executing the step
STOP_GRACE_S = 30.0  # a terminated step is waited for this long to end by itself
UNSERVED_FOR_S = 600.0  # a step whose queue no live worker consumes this long fails


class StepLost(Exception):
    """The worker that started the step no longer runs it and never will report it."""


class BrokerUnreachable(Exception):
    """Redis, holding the step's state, has not answered for BROKER_OUTAGE_S."""


class WatchedResult:
    """A step's Celery AsyncResult that also tells when its worker has lost it, or when no
    worker serves its queue."""

    def __init__(self, app: Any, result: Any, stores: list[Any] | None = None,
                 queue: str | None = None, sites: Mapping[str, str] | None = None) -> None:
        self._app, self._result = app, result
        self._stores = stores or []  # the Redis clients holding the step's mark
        self._queue, self._sites = queue, sites or {}  # its queue; each queue's site
        self._unserved_since: float | None = None  # when no worker was found on its queue
        self._next = time.monotonic() + WATCH_EVERY_S
        self._silent_since: float | None = None
        self._lost: str | None = None
        self._gone = 0  # looks in a row that found the PENDING step nowhere
        self._unreachable_since: float | None = None
        self._stopped_at: float | None = None  # when the run's Terminate stopped the step

    def ready(self) -> bool:
        try:
            done = self._result.ready()
            if done and self._stopping():
                return False
        except Exception as exc:
            if not self._result.backend.exception_safe_to_retry(exc):  # Celery's own test
                raise
            return self._unreachable(exc)
        self._unreachable_since = None
        if done:
            return True
        now = time.monotonic()
        if self._lost is None and now >= self._next:
            self._next = now + WATCH_EVERY_S
            try:
                self._lost = self._why_lost(now)
            except Exception as exc:  # noqa: BLE001 - a look that failed proves nothing
                LOG.warning("task %s: its worker could not be asked: %s", self._result.id, exc)
        return self._lost is not None

    def _unreachable(self, exc: Exception) -> bool:
        """Not known yet while Redis is unreachable (the step goes on at its worker), up to
        BROKER_OUTAGE_S; then the run fails, as it did at once before."""
        now = time.monotonic()
        where = self._result.backend.as_uri()  # its password masked
        if self._unreachable_since is None:
            self._unreachable_since = now
            LOG.warning("task %s: the Celery broker (result backend %s) is unreachable, waiting "
                        "up to %.0f s for it: %s", self._result.id, where, BROKER_OUTAGE_S, exc)
        elif now - self._unreachable_since >= BROKER_OUTAGE_S:
            raise BrokerUnreachable(
                f"the Celery broker (result backend {where}) has not answered for "
                f"{now - self._unreachable_since:.0f} s, the step's state unknown: {exc}"
            ) from exc
        return False

    def get(self) -> Any:
        """The step's events; a step taken for lost fails with why, unless it ended meanwhile.
        One revoked (by the look that found it lost) is lost too: a worker that hears a revoke
        of a task it has not started marks it REVOKED (Celery 5.7), which dagster-celery read
        as a step revoked by the run, failing the run without why ("steps {...} in an unknown
        state")."""
        if self._lost is not None and (not self._result.ready()
                                       or self._result.state == "REVOKED"):
            self._forget()
            raise StepLost(self._lost)
        try:
            return self._result.get()
        finally:
            self._forget()

    def _forget(self) -> None:
        for store in self._stores:
            with contextlib.suppress(Exception):  # a mark left expires by itself
                store.delete(SENT.format(self._result.id))

    def revoke(self) -> None:
        """The run was interrupted (a Terminate): its step is stopped where it executes. The
        revoke, a broadcast through Redis, is tried again once a second while Redis is
        unreachable, up to BROKER_OUTAGE_S (kombu's own tries give up after some 4 s: the run
        failed, its step going on to its end)."""
        while_unreachable(partial(self._result.revoke, terminate=True,
                                  signal=STOP_SIGNAL.name),
                          _connection_errors(self._app), f"task {self._result.id}: its revoke")
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()

    def _stopping(self) -> bool:
        """Whether the step, stopped, is still ending: the worker marks its task REVOKED as it
        signals it, and the step's own result (its failure) follows once it has cleaned up."""
        if self._stopped_at is None or self._result.state != "REVOKED":
            return False
        self._result = self._app.AsyncResult(self._result.id)  # the old one keeps REVOKED
        return time.monotonic() - self._stopped_at < STOP_GRACE_S

    def _why_lost(self, now: float) -> str | None:
        state = self._result.state
        if state == "PENDING":
            return self._lost_by_broker() or self._unserved(now)
        self._gone = 0
        if state != "STARTED":
            return None  # taken and not started, or retried: its worker still holds it
        info = self._result.info if isinstance(self._result.info, dict) else {}
        node = info.get("hostname")
        if not node:
            return None
        replies = self._app.control.inspect(destination=[node], timeout=2.0).active() or {}
        if node not in replies:
            self._silent_since = self._silent_since or now
            if now - self._silent_since < SILENT_FOR_S:
                return None
            return (f"Celery worker {node} (pid {info.get('pid')}) that started the step has "
                    f"not answered for {SILENT_FOR_S:.0f} s: taken for gone")
        self._silent_since = None
        if any(task.get("id") == self._result.id for task in replies[node]):
            return None
        if self._result.ready():
            return None  # it finished meanwhile
        return (f"Celery worker {node} no longer runs the step it started (pid "
                f"{info.get('pid')}): the worker was killed or restarted")

    def _lost_by_broker(self) -> str | None:
        """PENDING: queued (the broker holds the message), received by a worker, or lost with
        what Redis held (the message, or the step's STARTED or final state)."""
        task_id = self._result.id
        kept = [bool(store.exists(SENT.format(task_id))) for store in self._stores]
        if all(kept):  # no mark (not Redis): nothing tells a loss
            self._gone = 0
            return None
        held = self._app.control.inspect(timeout=2.0).query_task(task_id) or {}
        if not held:
            return None  # no worker answers (all down, or reconnecting): nothing proved
        if any(task_id in tasks for tasks in held.values()):
            self._gone = 0
            return None  # a worker received it, or runs it: it will report
        if self._result.ready():
            return None
        self._gone += 1
        if self._gone < GONE_LOOKS:
            return None
        self._result.revoke()  # its message, should it turn up after all, is not run
        return ("the Celery broker lost the step: Redis no longer holds its message or its "
                "state (restarted empty, failed over or flushed), and no worker runs it")

    def _unserved(self, now: float) -> str | None:
        """PENDING: whether any worker consumes the step's queue, asked of those that answer
        (none answering: none serves it)."""
        if self._queue is None:
            return None
        replies = self._app.control.inspect(timeout=2.0).active_queues() or {}
        if any(q.get("name") == self._queue for queues in replies.values() for q in queues):
            self._unserved_since = None
            return None
        if self._unserved_since is None:
            self._unserved_since = now
        if now - self._unserved_since < UNSERVED_FOR_S or self._result.state != "PENDING":
            return None  # not yet, or taken meanwhile
        self._result.revoke()  # not run by a worker started later for a failed run
        site = self._sites.get(self._queue)
        todo = (f"start `ccat-dt worker --site {site}` on a host of site {site}" if site else
                "it is no site's queue: the run was not routed to a site (its ccat/unrouted "
                "tag, if any, says why)")
        return (f'no live Celery worker has served queue "{self._queue}" for '
                f"{now - self._unserved_since:.0f} s, the step waiting there unstarted: {todo}")


_STEP = {"stoppable": False}  # in a worker's pool process: a step runs, not yet interrupted


def stoppable_steps() -> None:
    """In a worker's pool process (Celery's worker_process_init): STOP_SIGNAL interrupts the
    step the process executes, once (a second one must not break off its cleanup); between
    steps it is ignored (Celery's default would kill the process)."""
    from celery import signals

    def interrupt(_signum: int, _frame: Any) -> None:
        if _STEP["stoppable"]:
            _STEP["stoppable"] = False
            raise KeyboardInterrupt("the run was terminated")

    def started(**_: Any) -> None:
        _STEP["stoppable"] = True

    def ended(**_: Any) -> None:
        _STEP["stoppable"] = False

    signals.task_prerun.connect(started, weak=False)
    signals.task_postrun.connect(ended, weak=False)
    signal.signal(STOP_SIGNAL, interrupt)


def _connection_errors(app: Any) -> tuple[type[Exception], ...]:
    """What the broker's client raises while it cannot reach it (kombu wraps them)."""
    from kombu.exceptions import OperationalError

    with app.connection_for_write() as connection:
        return (OperationalError, *connection.connection_errors)


def _stores(app: Any) -> list[Any]:
    """A client for each Redis that holds the step (the broker, the result backend)."""
    import redis

    urls = {str(url) for url in (app.conf.broker_url, app.conf.result_backend) if url}
    return [redis.Redis.from_url(url, socket_timeout=5.0) for url in sorted(urls)
            if urlsplit(url).scheme in ("redis", "rediss", "unix")]


def while_unreachable(do: Callable[[], Any], errors: tuple[type[Exception], ...],
                      what: str) -> Any:
    """`do`, tried again once a second while it raises one of `errors` (Redis unreachable),
    up to BROKER_OUTAGE_S, as a run's look waits for Redis (redis-py's retry); longer, its
    last error (naming the server) fails the run."""
    from redis.backoff import ConstantBackoff
    from redis.retry import Retry

    def fail(exc: Exception) -> None:
        LOG.warning("%s could not be sent, Redis unreachable (%s): tried again in 1 s, up to "
                    "%.0f s in all", what, exc, BROKER_OUTAGE_S)

    return Retry(ConstantBackoff(1.0), int(BROKER_OUTAGE_S),
                 supported_errors=errors).call_with_retry(do, fail)


def mark_sent(stores: list[Any], task_id: str) -> None:
    """The mark of a step sent, in each Redis that holds it, sent while_unreachable."""
    import redis

    for store in stores:
        while_unreachable(partial(store.set, SENT.format(task_id), "1", ex=SENT_TTL_S),
                          (redis.ConnectionError, redis.TimeoutError, TimeoutError),
                          f"task {task_id}: its mark")


def watched_submit(app: Any, plan_context: Any, step: Any, queue: str, priority: int,
                   known_state: Any, sites: Mapping[str, str] | None = None) -> WatchedResult:
    """dagster-celery's own submission, its result watched, its mark left in Redis."""
    from dagster_celery.executor import _submit_task

    stores = getattr(app, "_ccat_stores", None)
    if stores is None:
        stores = app._ccat_stores = _stores(app)  # noqa: SLF001 - one per run's app
    result = _submit_task(app, plan_context, step, queue, priority, known_state)
    mark_sent(stores, result.id)
    return WatchedResult(app, result, stores, queue, sites)


def execute_watched(plan_context: Any, execution_plan: Any,
                    sites: Mapping[str, str] | None = None) -> Any:
    """CeleryExecutor.execute with the steps' results watched; `sites`: each queue's site."""
    from dagster_celery.core_execution_loop import core_celery_execution_loop

    return core_celery_execution_loop(plan_context, execution_plan,
                                      step_execution_fn=partial(watched_submit, sites=sites))

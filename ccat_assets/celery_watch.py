"""A step sent to a Celery worker that was killed (SIGKILL, the OOM killer, a machine that
stopped) or restarted never gets a result: the message was acknowledged as the task started,
so nothing redelivers it, and dagster-celery's loop would wait for it for ever, the run
STARTED and its partition in flight (no sensor asks for it again, no person is told).

The worker records where it runs each task (`task_track_started`: its node name and pid,
celery_app.py); the run asks that worker every WATCH_EVERY_S whether it still runs the task.
One that answers without it, or does not answer for SILENT_FOR_S, has lost the step: the step
fails with the cause, the run fails, and the re-attempt sensor asks for the work again (the
claims of the dead process are taken over, its `.part` file replaced)."""

from __future__ import annotations

import logging
import time
from typing import Any

LOG = logging.getLogger("ccat_assets.celery_watch")

WATCH_EVERY_S = 10.0
SILENT_FOR_S = 600.0  # a worker that does not answer for this long is taken for gone


class StepLost(Exception):
    """The worker that started the step no longer runs it and never will report it."""


class WatchedResult:
    """A step's Celery AsyncResult that also tells when its worker has lost it."""

    def __init__(self, app: Any, result: Any) -> None:
        self._app, self._result = app, result
        self._next = time.monotonic() + WATCH_EVERY_S
        self._silent_since: float | None = None
        self._lost: str | None = None

    def ready(self) -> bool:
        if self._result.ready():
            return True
        now = time.monotonic()
        if self._lost is None and now >= self._next:
            self._next = now + WATCH_EVERY_S
            try:
                self._lost = self._why_lost(now)
            except Exception as exc:  # noqa: BLE001 - a look that failed proves nothing
                LOG.warning("task %s: its worker could not be asked: %s", self._result.id, exc)
        return self._lost is not None

    def get(self) -> Any:
        if self._lost is not None and not self._result.ready():
            raise StepLost(self._lost)
        return self._result.get()

    def revoke(self) -> None:
        self._result.revoke()

    def _why_lost(self, now: float) -> str | None:
        if self._result.state != "STARTED":
            return None  # queued, or taken and not started: the broker still holds it
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


def watched_submit(app: Any, *args: Any) -> WatchedResult:
    """dagster-celery's own submission, its result watched."""
    from dagster_celery.executor import _submit_task

    return WatchedResult(app, _submit_task(app, *args))


def execute_watched(plan_context: Any, execution_plan: Any) -> Any:
    """CeleryExecutor.execute with the steps' results watched."""
    from dagster_celery.core_execution_loop import core_celery_execution_loop

    return core_celery_execution_loop(plan_context, execution_plan,
                                      step_execution_fn=watched_submit)

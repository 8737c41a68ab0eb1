"""An interrupted step stops: it is not retried within its run.

Dagster re-executes a step interrupted under a retry policy (a preempted worker, in its view).
Here an interrupt is an operator's Terminate (the UI's, passed on by `drive` or a sensor) or
Ctrl-C: the run ends, and its work is asked for again after the back-off (a run an operator
terminated, CANCELED, is no failed attempt of it: ccat_dt/reattempt.py). An interrupt with no
Terminate recorded (Ctrl-C in an operator's `dagster asset materialize`, its service stopped)
marks the run CANCELING first (`_canceling`), so it too ends CANCELED, not FAILURE, and tags it
stopped by no person (`stopped_by_no_person`: the same work stopped so again and again past the
horizon is told to a person, ccat_dt/reattempt.py).

- The step that copies, packs or unpacks fails once (stops_when_interrupted), so the run ends
  CANCELED (Dagster's verdict for a failed step of a run being terminated) without starting
  the transfer again.
- A run force-terminated (CANCELED at once) would end FAILURE on a failed step, so there, and
  in any other retried step (the purge), the interrupt becomes Dagster's retry request, which
  NOT_RETRIED, a hook of each retried asset, turns back into the run's interrupt before the
  retry starts: Dagster then leaves a CANCELED run CANCELED (a CANCELING one ends CANCELED,
  any other FAILURE). Before, the retry ran after RETRY_DELAY_S unless a second interrupt came
  first, and a force-terminated run ended SUCCESS, its step's work done again. Only where
  steps execute in the run's process (the embedded default): under Celery the run stops at
  its first interrupt and sends no retry."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

from dagster import (
    DagsterEvent,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    Failure,
    HookContext,
    HookDefinition,
)
from dagster._core.definitions.events import HookExecutionResult
from dagster._core.errors import DagsterExecutionInterruptedError

from ccat_assets.tags import STOPPED_TAG

INTERRUPTED = "interrupted: the run was terminated or its process told to stop"
TERMINATED = (DagsterRunStatus.CANCELING, DagsterRunStatus.CANCELED)
INTERRUPTS = ("DagsterExecutionInterruptedError", "KeyboardInterrupt")


@contextmanager
def stops_when_interrupted(instance: DagsterInstance | None, run_id: str) -> Iterator[None]:
    try:
        yield
    except (DagsterExecutionInterruptedError, KeyboardInterrupt) as exc:
        run = instance.get_run_by_id(run_id) if instance is not None else None
        if run is not None and run.status == DagsterRunStatus.CANCELED:
            raise  # "Force termination" marked it: a failed step would make it FAILURE;
            # Dagster asks for a retry, and NOT_RETRIED ends the run instead, still CANCELED
        if instance is not None:
            _canceling(instance, run_id)
        raise Failure(description=f"{INTERRUPTED}; not retried within the run",
                      allow_retries=False) from exc


def _stop_instead_of_retrying(context: HookContext, event_list: Sequence[DagsterEvent]
                              ) -> HookExecutionResult:
    """After each attempt of the step: one that asks for a retry, interrupted or in a run an
    operator terminated, ends the run instead (Dagster's handling of an interrupt that reaches
    the run: CANCELING becomes CANCELED, CANCELED stays, any other run fails)."""
    retries = [event.step_retry_data.error for event in event_list
               if event.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
    if not retries:
        return HookExecutionResult(context.hook_def.name, is_skipped=True)
    if any(error is not None and error.cause is not None and error.cause.cls_name in INTERRUPTS
           for error in retries) or _terminated(context.instance, context.run_id):
        _canceling(context.instance, context.run_id)
        raise DagsterExecutionInterruptedError(f"{INTERRUPTED}; the step is not retried")
    return HookExecutionResult(context.hook_def.name, is_skipped=False)


def _canceling(instance: DagsterInstance, run_id: str) -> None:
    """A run interrupted with no operator's Terminate recorded (Ctrl-C in the terminal of an
    operator's `dagster asset materialize`, the service running it stopped) marked CANCELING,
    so that it ends CANCELED as a terminated one does: a person stopped it, no failed attempt
    of its work (ccat_dt/reattempt.py: never escalated for it). Before, it ended FAILURE, a
    failed attempt, and past the horizon the work was escalated. Best effort: the run storage
    failing, it ends FAILURE as before."""
    try:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status not in TERMINATED and not run.is_finished:
            stopped_by_no_person(instance, run_id, "signal")
            instance.report_run_canceling(run, message=f"{INTERRUPTED} (Ctrl-C, a signal): "
                                          "an operator's stop, no failed attempt")
    except Exception:  # noqa: BLE001 - see above
        pass


def stopped_by_no_person(instance: DagsterInstance, run_id: str, how: str) -> None:
    """Tag a run about to be marked CANCELING or CANCELED with no operator's Terminate
    recorded (tags.STOPPED_TAG = `how`: "drive", its drive stopped; "signal", its own process
    told to stop). It is no failed attempt either, but the same work stopped so again and
    again past the re-attempt horizon (a drive under `timeout` or a nightly shutdown, shorter
    than its transfer) is told to a person (ccat_dt/reattempt.py); an operator's Terminate,
    untagged, is not. Best effort: untagged, it counts as an operator's cancel, as before."""
    with suppress(Exception):  # see above
        instance.add_run_tags(run_id, {STOPPED_TAG: how})


def _terminated(instance: DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is not None and run.status in TERMINATED


NOT_RETRIED = HookDefinition(name="not_retried_when_interrupted",
                             hook_fn=_stop_instead_of_retrying)

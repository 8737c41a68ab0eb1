"""An interrupted step stops: it is not retried within its run.

Dagster re-executes a step interrupted under a retry policy (a preempted worker, in its view).
Here an interrupt is an operator's Terminate (the UI's, or `drive` passing it on) or Ctrl-C:
the step that copies, packs or unpacks fails once instead, so the run ends CANCELED (Dagster's
verdict for a failed step of a run being terminated) without starting the transfer again, and
its work is re-attempted after the back-off like any failed run's."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dagster import DagsterInstance, DagsterRunStatus, Failure
from dagster._core.errors import DagsterExecutionInterruptedError

INTERRUPTED = "interrupted: the run was terminated or its process told to stop"


@contextmanager
def stops_when_interrupted(instance: DagsterInstance | None, run_id: str) -> Iterator[None]:
    try:
        yield
    except (DagsterExecutionInterruptedError, KeyboardInterrupt) as exc:
        run = instance.get_run_by_id(run_id) if instance is not None else None
        if run is not None and run.status == DagsterRunStatus.CANCELED:
            raise  # "Force termination" marked it: it stays CANCELED only if interrupted
        raise Failure(description=f"{INTERRUPTED}; not retried within the run",
                      allow_retries=False) from exc

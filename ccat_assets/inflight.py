"""What runs are queued or running now, whoever launched them (a backfill, the UI, another
sensor): the sensors ask for no second run of a partition in flight, and the purge deletes
nothing of a package a run in flight may be reading."""

from __future__ import annotations

from collections.abc import Sequence

from dagster import DagsterInstance, RunRequest, RunsFilter
from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES

from ccat_assets.routing import partition_of, stage_of

# Runs in flight are bounded by the run queue (max_concurrent_runs plus what waits); this
# caps one sensor tick's look at them.
LIMIT = 5000


def in_flight(instance: DagsterInstance) -> set[tuple[str, str, str | None]]:
    """(stage, package, site) of every queued or running lifecycle run."""
    out = set()
    for run in instance.get_runs(RunsFilter(statuses=list(NOT_FINISHED_STATUSES)),
                                 limit=LIMIT):
        stage, partition = stage_of(run), partition_of(run.tags)
        if stage is not None and partition is not None:
            out.add((stage, *partition))
    return out


def not_in_flight(instance: DagsterInstance, requests: Sequence[RunRequest],
                  stage_of_job: dict[str, str], default_stage: str = "") -> list[RunRequest]:
    """The requests whose partition has no run in flight for the same stage (a request
    without a job name is for `default_stage`, its sensor's job)."""
    busy = in_flight(instance)
    if not busy:
        return list(requests)
    kept = []
    for request in requests:
        stage = stage_of_job.get(request.job_name or "", default_stage)
        key = str(request.partition_key or "")
        package, _, site = key.partition("|")
        if (stage, package, site or None) not in busy:
            kept.append(request)
    return kept


def packages_in_flight(instance: DagsterInstance) -> set[str]:
    """Packages some run in flight may read or write (any stage but the purge itself)."""
    return {package for stage, package, _ in in_flight(instance) if stage != "purge_status"}

"""What runs are queued or running now, whoever launched them (a backfill, the UI, another
sensor): the sensors ask for no second run of a partition in flight, and the purge deletes
nothing of a package a run in flight may be reading."""

from __future__ import annotations

from collections.abc import Sequence

from dagster import DagsterInstance, DagsterRunStatus, RunRequest, RunsFilter
from dagster._core.storage.dagster_run import FINISHED_STATUSES, NOT_FINISHED_STATUSES
from dagster._core.storage.tags import PARTITION_NAME_TAG

from ccat_assets.routing import partition_of, stages_of
from ccat_assets.stages import stages_of_job
from ccat_dt.stages import Stage

# A run in one of these has not ended (a run whose process died stays in one until closed).
IN_FLIGHT = [DagsterRunStatus.NOT_STARTED, DagsterRunStatus.QUEUED, DagsterRunStatus.STARTING,
             DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]

# Runs in flight are bounded by the run queue (max_concurrent_runs plus what waits); this
# caps one sensor tick's look at them.
LIMIT = 5000
LATER = 20  # later finished runs of a partition looked at for one of the same work


def in_flight(instance: DagsterInstance) -> set[tuple[Stage, str, str | None]]:
    """(stage, package, site) of every queued or running lifecycle run (each stage of a run
    that does several). A run that a later run of the same work outlived (one of its stages,
    the same partition, created after it and finished) counts as dead: its process was killed
    and `ccat-dt retry` did its work again. A later run of another stage of the partition (the
    UI's "Materialize" of a package's purge_status while it is being built) proves nothing."""
    out: set[tuple[Stage, str, str | None]] = set()
    for record in instance.get_run_records(RunsFilter(statuses=list(NOT_FINISHED_STATUSES)),
                                           limit=LIMIT):
        run = record.dagster_run
        stages, partition = stages_of(run), partition_of(run.tags)
        if not stages or partition is None or PARTITION_NAME_TAG not in run.tags:
            continue
        later = instance.get_runs(RunsFilter(
            tags={PARTITION_NAME_TAG: run.tags[PARTITION_NAME_TAG]},
            statuses=list(FINISHED_STATUSES), created_after=record.create_timestamp),
            limit=LATER)
        if not any(set(stages_of(other)) & set(stages) for other in later):
            out.update((stage, *partition) for stage in stages)
    return out


def not_in_flight(instance: DagsterInstance, requests: Sequence[RunRequest],
                  default_stage: Stage | None = None) -> list[RunRequest]:
    """The requests whose partition has no run in flight for any of the stages they do (a
    request without a job name is for `default_stage`, its sensor's job)."""
    if not requests:
        return []  # the runs in flight are not looked at (a query per run) for nothing
    busy = in_flight(instance)
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

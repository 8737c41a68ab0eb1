"""Runs launched without the sensors' tags (the UI's "Materialize", a backfill, `dagster asset
materialize`) are routed like sensor runs: the `ccat/link` tag (per-link run limits) and the
site queue (`ccat/queue`, used by the Celery executor).

Why two hooks, and not job or asset tags: the link and the queue depend on the partition
(which site, and where the bytes come from now, which OpsDB knows), while `tags`/`op_tags` on
an asset or job are static, and a run-level hook runs after the run was created and dequeued.
So:

- `RoutedRunCoordinator` (the instance's run coordinator, `dagster.yaml`) adds the tags when a
  run is submitted, before it is queued: the queue's tag concurrency limits then apply to it
  exactly as to a sensor's run. This covers everything the webserver and the daemon launch
  (UI, backfills, sensors, schedules).
- The executors (`execution.executor`) add them when the run starts, for runs that bypass
  the run coordinator (`dagster asset materialize`, `execute_job`), and the Celery executor
  sends the steps to the `ccat/queue` queue unless the run config names one.

Tags already on a run (the sensors set both) are not changed when it is submitted, but for a
re-execution (the UI's Re-execute): it carries its parent's tags, routed for where the data
was then, so it is routed afresh for where OpsDB says the data is now. If OpsDB cannot be
asked, the run goes untagged rather than not at all (and says so in its tags).

A queued run is routed again (`reroute`) right before it starts, for where the data is then:
its link may have changed while it waited (a backfill's copy to a second archive submitted
before any archive had the package: no link then, archive to archive now; a source purged; a
nearer archive). `ccat-dt drive` does it as its run pool takes a run from its queue
(runpool.py); under the daemon, the run coordinator does it for the runs the dequeue is about
to start, as the dequeue asks it for the run limits (`route_next`)."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from functools import lru_cache, partial
from typing import Any

from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    ExecutorDefinition,
    Failure,
    RunsFilter,
    in_process_executor,
)
from dagster._core.executor.base import Executor
from dagster._core.executor.in_process import InProcessExecutor
from dagster._core.executor.init import InitExecutorContext
from dagster._core.run_coordinator import QueuedRunCoordinator, SubmitRunContext
from dagster._core.run_coordinator.queued_run_coordinator import RunQueueConfig
from dagster._core.storage.dagster_run import ACTIVE_RUN_STATUSES
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_START_TAG,
    MULTIDIMENSIONAL_PARTITION_PREFIX,
    PARENT_RUN_ID_TAG,
    PARTITION_NAME_TAG,
    PRIORITY_TAG,
)
from dagster._utils.tags import TagConcurrencyLimitsCounter

from ccat_assets.instance import instance_home
from ccat_assets.partitions import PACKAGES, staging_partitions
from ccat_assets.stages import ASSET_STAGE, stages_of_job
from ccat_assets.tags import (
    LINK_TAG,
    PROCESS_TAGS,
    PROVENANCE_TAGS,
    QUEUE_TAG,
    STOPPED_TAG,
    UNROUTED_TAG,
)
from ccat_dt.config import Config, load_config
from ccat_dt.dispatch import dispatch_for
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.ownership import WrongUser, refuse_root_on_foreign, written_first
from ccat_dt.packages import get_package
from ccat_dt.queues import queue_sites
from ccat_dt.stages import Stage
from ccat_dt.staging import get_request

LOG = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def _opsdb(url: str, pid: int) -> OpsDB:  # one engine per process (the webserver, daemon)
    return OpsDB(url)


def stages_of(run: DagsterRun) -> tuple[Stage, ...]:
    """The lifecycle stages a run materialises, in lifecycle order; for a run of checks alone
    (the Checks tab's "Execute" on a partition: the asset job, no asset selected) the stages
    of the assets its checks read, which it is routed as (their site's queue)."""
    keys = run.asset_selection or {check.asset_key for check in run.asset_check_selection or ()}
    if keys:
        names = {key.to_user_string() for key in keys}
        return tuple(dict.fromkeys(stage for name, stage in ASSET_STAGE.items()
                                   if name in names))
    return stages_of_job(run.job_name)


def checks_alone(instance: DagsterInstance, run: DagsterRun) -> bool:
    """Whether the run executes asset checks and no asset: the integrity sensor's recheck of
    a partition given an event by hand, the Checks tab's "Execute" on a partition. It looks
    at the work; it does not attempt it. A run submitted so (the daemon's, the UI's) names
    its checks; one `ccat-dt drive` made executes a subset of its job and names none, and
    then has no materialization planned in its event log (one query)."""
    if run.asset_selection:
        return False
    if run.asset_check_selection:
        return True
    return not instance.get_records_for_run(
        run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION_PLANNED, limit=1).records


def stage_of(run: DagsterRun) -> Stage | None:
    """The stage a run is routed as: its first (a run that copies to a site and archives there
    loads the copy's link; its steps run at that site)."""
    stages = stages_of(run)
    return stages[0] if stages else None


def partition_of(tags: Mapping[str, str]) -> tuple[str, str | None] | None:
    package = tags.get(f"{MULTIDIMENSIONAL_PARTITION_PREFIX}package")
    if package is not None:
        return package, tags.get(f"{MULTIDIMENSIONAL_PARTITION_PREFIX}site")
    key = tags.get(PARTITION_NAME_TAG)
    if key is None:
        return None
    if "|" in key:
        package, site = key.split("|", 1)
        return package, site
    return key, None


def routing_tags(config: Config, run: DagsterRun, afresh: bool = False) -> dict[str, str]:
    """The tags the run lacks: {ccat/link, ccat/queue}, or {} for a run that needs none
    (the scrub, a run with the sensors' tags already). `afresh` (a re-execution): both
    computed again, replacing the run's; a link no longer needed is blanked (a run without
    one: it transfers nothing), never kept."""
    stage, partition = stage_of(run), partition_of(run.tags)
    if stage is None or partition is None or (run.tags.get(QUEUE_TAG) and not afresh):
        return {}
    try:
        dispatch = dispatch_for(_opsdb(config.opsdb_url, os.getpid()), config, stage, *partition)
    except Exception as exc:  # noqa: BLE001 - never keep a run from starting for its tags
        LOG.warning("run %s not routed: %s", run.run_id, exc)
        # A re-execution's old queue is blanked (the executor asks again as the run starts),
        # its old link kept: a link's run limit still applies to it meanwhile.
        stale = {QUEUE_TAG: ""} if afresh and run.tags.get(QUEUE_TAG) else {}
        return {UNROUTED_TAG: str(exc)[:200], **stale}
    tags = {QUEUE_TAG: dispatch.queue}
    if dispatch.link and (afresh or not run.tags.get(LINK_TAG)):
        tags[LINK_TAG] = dispatch.link
    elif afresh and run.tags.get(LINK_TAG):
        tags[LINK_TAG] = ""
    if afresh and run.tags.get(UNROUTED_TAG):
        tags[UNROUTED_TAG] = ""
    return tags


def tag_run(instance: DagsterInstance, config: Config, run: DagsterRun,
            afresh: bool = False) -> DagsterRun:
    tags = routing_tags(config, run, afresh)
    if not tags:
        return run
    instance.add_run_tags(run.run_id, tags)
    return instance.get_run_by_id(run.run_id) or run


def reroute(instance: DagsterInstance, config: Config, run: DagsterRun) -> DagsterRun:
    """The run's `ccat/link` and `ccat/queue` as OpsDB says now, written on it where they
    differ: a queued run about to start. Its link was computed when it was submitted and
    may have changed while it waited (no copy to send from then, the archive it was to be
    fed from since the nearest or its buffer copy purged): started on the old one, it loaded a
    link whose `max_concurrent` did not count it. A link no longer needed is blanked. If OpsDB
    cannot be asked, the run keeps its tags."""
    stage, partition = stage_of(run), partition_of(run.tags)
    if stage is None or partition is None:
        return run
    try:
        dispatch = dispatch_for(_opsdb(config.opsdb_url, os.getpid()), config, stage, *partition)
    except Exception as exc:  # noqa: BLE001 - never keep a run from starting for its tags
        LOG.warning("run %s not routed again: %s", run.run_id, exc)
        return run
    now = {LINK_TAG: dispatch.link or "", QUEUE_TAG: dispatch.queue, UNROUTED_TAG: ""}
    changed = {tag: value for tag, value in now.items() if run.tags.get(tag, "") != value}
    if not changed:
        return run
    instance.add_run_tags(run.run_id, changed)
    return instance.get_run_by_id(run.run_id) or run


NO_PARTITION = (
    "not run: each of these checks reads one partition (a copy, a package's files) and this "
    "run has none (the Checks tab's \"Execute all\" launches them without one). To re-read "
    "a copy: Partitions -> a partition -> Materialize; the fixity scrub re-reads every LTA "
    "copy")


def checks_without_partition(run: DagsterRun) -> bool:
    """A run of asset checks alone and without a partition: the Checks tab's "Execute all"
    on our (partitioned) assets. Dagster cannot evaluate a partitioned check in it ("Cannot
    access partition_key for a non-partitioned run"), and the failed run turned the asset
    red in the lineage ("execution failed") on healthy data until its next
    materialization. Such a run is canceled before it is queued: its checks read "skipped"."""
    return (bool(run.asset_check_selection) and not run.asset_selection
            and partition_of(run.tags) is None and ASSET_PARTITION_RANGE_START_TAG not in run.tags)


class RoutedRunCoordinator(QueuedRunCoordinator):
    """QueuedRunCoordinator that routes a run before queueing it (config from
    $CCAT_DT_CONFIG, as the code location). Configure in dagster.yaml:
    `run_coordinator: {module: ccat_assets.routing, class: RoutedRunCoordinator}`."""

    def submit_run(self, context: SubmitRunContext) -> DagsterRun:
        run = self._without_inherited(context.dagster_run)
        if checks_without_partition(run):
            self._instance.report_run_canceled(run, message=NO_PARTITION)
            return self._instance.get_run_by_id(run.run_id) or run
        try:
            config = load_config()
        except Exception as exc:  # noqa: BLE001 - a bad config must not block every run
            LOG.warning("run %s not routed: configuration: %s", run.run_id, exc)
            return super().submit_run(SubmitRunContext(run, context.workspace))
        run = tag_run(self._instance, config, run, afresh=PARENT_RUN_ID_TAG in run.tags)
        return super().submit_run(SubmitRunContext(run, context.workspace))

    def get_run_queue_config(self) -> RunQueueConfig:
        """The run limits; asked for by the daemon's dequeue at the start of each pass over
        the queue (and by the UI, and each run as it starts). In the daemon's dequeue, the
        queued runs it is about to start are first routed again (route_next)."""
        limits = super().get_run_queue_config()
        if threading.current_thread().name == DEQUEUE_THREAD:
            try:
                route_next(self._instance, load_config(), limits)
            except Exception as exc:  # noqa: BLE001 - the dequeue goes on with the tags as
                LOG.warning("queued runs not routed again: %s", exc)  # they are
        return limits

    def _without_inherited(self, run: DagsterRun) -> DagsterRun:
        """A re-execution (the UI's Re-execute) with the tags naming its parent's process
        (tags.PROCESS_TAGS: it gets its own as it starts) and how its parent was asked for
        (tags.PROVENANCE_TAGS: an operator's UI action is neither) blanked."""
        inherited = {tag: "" for tag in (*PROCESS_TAGS, *PROVENANCE_TAGS, STOPPED_TAG)
                     if run.tags.get(tag)}
        if PARENT_RUN_ID_TAG not in run.tags or not inherited:
            return run
        self._instance.add_run_tags(run.run_id, inherited)
        return self._instance.get_run_by_id(run.run_id) or run


# The thread in which Dagster's daemon dequeues runs (dagster._daemon.controller names each
# daemon's thread "dagster-daemon-" + its type; the queue's is QUEUED_RUN_COORDINATOR).
DEQUEUE_THREAD = "dagster-daemon-QUEUED_RUN_COORDINATOR"


def route_next(instance: DagsterInstance, config: Config, limits: RunQueueConfig) -> None:
    """Route again (reroute) each queued run the daemon's dequeue would start now: in its
    order (priority, then oldest first), within `max_concurrent_runs` and the tag limits,
    each judged by its link as OpsDB says now, not as it was when submitted. A run whose link
    changed to one at its limit is left queued, and the next one looked at. The dequeue reads
    the runs' tags right after this (its pass over the queue). A run held back by the link
    it was given waits for that link, as before."""
    active = instance.get_runs(RunsFilter(statuses=list(ACTIVE_RUN_STATUSES)))
    slots = (sys.maxsize if limits.max_concurrent_runs < 0
             else limits.max_concurrent_runs - len(active))
    if slots <= 0:
        return
    counter = TagConcurrencyLimitsCounter(limits.tag_concurrency_limits, active)
    queued = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.QUEUED]), ascending=True)
    for run in sorted(queued, key=_priority, reverse=True):  # stable: oldest first
        if slots <= 0:
            break
        if counter.is_blocked(run):
            continue
        run = reroute(instance, config, run)
        if counter.is_blocked(run):
            continue
        counter.update_counters_with_launched_item(run)
        slots -= 1


def _priority(run: DagsterRun) -> int:
    """The dequeue's order (QueuedRunCoordinatorDaemon._priority_sort)."""
    try:
        return int(run.tags.get(PRIORITY_TAG, "0"))
    except ValueError:
        return 0


def check_launch(instance: DagsterInstance, config: Config, run: DagsterRun) -> None:
    """What a run launched by hand may carry that no run of ours can do, refused as it starts,
    before any step (the run fails once, the cause as its headline): a `resources:` section in
    its run config, or a partition none of its assets has (the launchpad's tags and config are
    editable). A package or staging request whose partition is gone is brought back. A run
    executed as root (a root `dagster dev` or `dagster asset materialize`) on a deployment
    another user owns is refused (ccat_dt/ownership.py)."""
    try:
        refuse_root_on_foreign(written_first(config, instance_home(config)), None)
    except WrongUser as exc:
        raise Failure(description=str(exc), allow_retries=False) from exc
    given = run.run_config.get("resources")
    resources = sorted(key for key, entry in given.items() if entry) if isinstance(
        given, Mapping) else []
    if resources:
        raise Failure(description=(
            f"refused: its run config sets resources ({', '.join(resources)}), which are the "
            f"deployment's ({config.path}: its OpsDB, sites and locations), never one run's; "
            "launch it again without `resources:` in its config. Nothing was done"),
            allow_retries=False)
    if (wrong := wrong_partition(config, run)) is not None:
        raise Failure(description=f"{wrong}; nothing was done", allow_retries=False)
    ensure_partition(instance, config, run)


def wrong_partition(config: Config, run: DagsterRun) -> str | None:
    """Why the run's partition tags name no partition of its assets, if they do not: a
    package x site asset's partition needs an archive site, a package's (or staging
    request's) none. Dagster ran such a run's steps, which failed on its internals ("Partition
    range ccat to ccat is not a valid range", "Expected 2 partition keys") or planned a copy
    to a site that is no archive ("no verified copy to send to ccat yet")."""
    partition, stages = partition_of(run.tags), stages_of(run)
    if partition is None or not stages:
        return None
    keys = run.asset_selection or {check.asset_key for check in run.asset_check_selection or ()}
    chosen = {key.to_user_string() for key in keys}
    assets = ", ".join(name for name, stage in ASSET_STAGE.items()
                       if (name in chosen if chosen else stage in stages))
    dimensions = any(tag.startswith(MULTIDIMENSIONAL_PARTITION_PREFIX) for tag in run.tags)
    key = "|".join(part for part in partition if part is not None)
    sites = [site.short_name for site in config.settings.archive_sites]
    if any(stage in (Stage.SITE_COPY, Stage.LTA_COPY) for stage in stages):
        if partition[1] not in sites:
            return (f"{key!r} is no partition of {assets}: its partitions are PACKAGE|SITE, "
                    f"SITE an archive site ({', '.join(sites)})")
    elif partition[1] is not None or dimensions:
        return f"{key!r} is no partition of {assets}: its partitions are names without a site"
    return None


def ensure_partition(instance: DagsterInstance, config: Config, run: DagsterRun) -> None:
    """A run of a package whose partition is gone (retired after archiving, an OpsDB restored
    from an older backup), launched by hand (the UI's Re-execute, the GraphQL API): Dagster
    failed its steps with its internal "Partition range X to X is not a valid range" before
    their code ran. A package (or staging request) OpsDB knows gets its partition back, as
    the sensors' runs do (partitions.revived); one it does not know fails the run saying so."""
    partition = partition_of(run.tags)
    if partition is None:
        return
    name, staging = partition[0], staging_partitions.name
    assert staging is not None
    dimension, what, lookup = ((staging, "staging request", get_request)
                               if stage_of(run) == Stage.STAGING
                               else (PACKAGES, "package", get_package))
    if instance.has_dynamic_partition(dimension, name):
        return
    try:
        with _opsdb(config.opsdb_url, os.getpid()).session() as session:
            lookup(session, name)
    except LookupError as exc:
        raise Failure(description=f"{exc}: OpsDB has no such {what} (a partition left over, "
                      "or OpsDB restored from an older backup); nothing to do",
                      allow_retries=False) from exc
    instance.add_dynamic_partitions(dimension, [name])


def _routed(config: Config, executor: Executor, tag_only: bool) -> None:
    """Patch `executor.execute` to tag the run (and pick its Celery queue) when it starts."""
    inner = executor.execute

    def execute(plan_context: Any, execution_plan: Any) -> Any:
        from ccat_assets.inflight import record_worker  # imports this module

        record_worker(plan_context.instance, plan_context.dagster_run)  # its process: which
        # tells when it died (inflight.liveness)
        run = tag_run(plan_context.instance, config, plan_context.dagster_run)
        check_launch(plan_context.instance, config, run)
        queue = run.tags.get(QUEUE_TAG)
        if not tag_only and queue and not getattr(executor, "_queue_from_run_config", False):
            _send_to(executor, queue)
        return inner(plan_context, execution_plan)

    executor.execute = execute  # type: ignore[method-assign]


def _send_to(executor: Any, queue: str) -> None:
    """The Celery executor's steps go to `queue`. dagster-celery keeps its settings as an
    object (config.dict_wrapper), not a mapping: unpacked as one, it failed every run without
    a queue in its run config (the UI's Materialize, a backfill, the integrity sensor's check
    reruns) with "'dict_wrapper' object is not a mapping" before a step ran."""
    from dagster_celery.config import dict_wrapper

    source = executor.config_source
    settings = dict(source) if isinstance(source, Mapping) else dict(vars(source))
    executor.config_source = dict_wrapper({**settings, "task_default_queue": queue})


def routed_in_process_executor(config: Config) -> ExecutorDefinition:
    def create(context: InitExecutorContext) -> Executor:
        executor = in_process_executor.executor_creation_fn(context)  # type: ignore[misc]
        assert isinstance(executor, InProcessExecutor)
        _routed(config, executor, tag_only=True)
        return executor

    return ExecutorDefinition(name="in_process",
                              config_schema=in_process_executor.config_schema,  # type: ignore[arg-type]
                              executor_creation_fn=create,
                              description=in_process_executor.description)


def routed_celery_executor(config: Config) -> ExecutorDefinition:
    """dagster-celery's executor, its steps routed and watched. A run without execution config
    (the UI's Materialize, a backfill, `dagster asset materialize`, the integrity sensor's
    check reruns) gets the deployment's broker and result backend. The backend has a schema
    default (rpc://), so it is always "given": kept, the run waited for ever for results the
    workers had stored in the deployment's backend (Redis), its step done."""
    from dagster_celery import celery_executor
    from dagster_celery.defaults import result_backend

    from ccat_assets.celery_watch import PUBLISH_RETRY_POLICY, execute_watched

    def create(context: InitExecutorContext) -> Executor:
        executor: Any = celery_executor.executor_creation_fn(context)  # type: ignore[misc]
        given: Mapping[str, Any] = context.executor_config.get("config_source") or {}  # type: ignore[assignment]
        executor._queue_from_run_config = "task_default_queue" in given  # noqa: SLF001
        if "broker" not in context.executor_config and config.celery_broker:
            executor.broker = config.celery_broker  # a UI run has no execution config
        if context.executor_config.get("backend") in (None, result_backend) and (
                config.celery_backend):
            executor.backend = config.celery_backend  # not the default rpc:// (see above)
        # a step sent while Redis is unreachable is sent once it is back (celery_watch.py)
        vars(executor.config_source).setdefault("task_publish_retry_policy",
                                                PUBLISH_RETRY_POLICY)
        # a step whose worker was killed, or whose queue no worker serves, fails the run
        executor.execute = partial(execute_watched, sites=queue_sites(config))
        _routed(config, executor, tag_only=False)
        return executor

    return ExecutorDefinition(name=celery_executor.name,
                              config_schema=celery_executor.config_schema,  # type: ignore[arg-type]
                              executor_creation_fn=create,
                              description=celery_executor.description)

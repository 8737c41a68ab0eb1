"""Work whose run failed, or whose process died, is requested again after a back-off that
grows per attempt (ccat_dt/reattempt.py), up to the horizon; then it is escalated. Staging
too: a request whose processing disk was not mounted is staged once it is back."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRecord,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)
from dagster._core.definitions.assets.job.asset_job import IMPLICIT_ASSET_JOB_NAME

from ccat_assets.driver import stopped_by_operator
from ccat_assets.execution import on_queue
from ccat_assets.inflight import IN_FLIGHT
from ccat_assets.partitions import package_site_key, revived
from ccat_assets.routing import checks_alone, stages_of
from ccat_assets.stages import ASSET_STAGE, JOBS, copy_job, jobs_of, site_copy, stages_of_job
from ccat_assets.tags import AGAIN_TAG, LINK_TAG, NEXT_AT, RETRY_TAG, STOPPED_TAG, WORK_TAG
from ccat_dt.config import Config
from ccat_dt.diagnosis import stopped_reason
from ccat_dt.opsdb.models import _aware, utcnow
from ccat_dt.packages import get_package
from ccat_dt.pending import unfinished
from ccat_dt.queues import archive_queue, packaging_queue, staging_queue, transfer_queue
from ccat_dt.reattempt import (
    Backoff,
    Decision,
    RunOutcome,
    State,
    Work,
    as_recorded,
    carried_over,
    decide,
    idle_error,
    record,
    waiting,
)
from ccat_dt.retry import Stalled, stalled_work
from ccat_dt.routing import replication_source
from ccat_dt.stages import Stage
from ccat_dt.staging import get_request
from resources.deployment import Deployment
from sensors.cursor import json_object, number, read_cursor
from sensors.stopped import held

STAGES = (Stage.PACKAGING, Stage.SITE_COPY, Stage.LTA_COPY, Stage.STAGING)
SWEPT_AT = "swept_at"  # in the cursor: when the last sweep for unattended work was (epoch s)
SWEPT_TO = "swept_to"  # and the last package it looked at (the next sweep goes on from there)
NEVER_SWEPT: tuple[datetime | None, str] = (None, "")
# Runs whose work is requested again: failed, or canceled by an operator (not a failed
# attempt: ccat_dt/reattempt.py; yet not dropped, asked for again after the back-off).
FAILED = [DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]
PARTITION, PACKAGE_DIM, SITE_DIM = ("dagster/partition", "dagster/partition/package",
                                    "dagster/partition/site")


def _works_of(record_: RunRecord) -> list[tuple[Stage, str, str]]:
    """The work of a run: of each stage it does (a copy with its archiving does two)."""
    run = record_.dagster_run
    stages = [stage for stage in stages_of_job(run.job_name) or stages_of(run)  # or a UI
              if stage in STAGES]  # run's (the asset job): the stages of its assets
    if PACKAGE_DIM in run.tags:
        return [(stage, run.tags[PACKAGE_DIM], run.tags.get(SITE_DIM, "")) for stage in stages]
    if PARTITION in run.tags:
        return [(stage, run.tags[PARTITION], "") for stage in stages]
    return []


def history(instance: DagsterInstance, stage: Stage, package: str, site: str,
            tags: dict[str, str] | None = None) -> list[RunOutcome]:
    """The runs of one piece of work (of every job that does it), oldest first. A failed
    run of checks alone (a recheck that found the copy bad: the system doing its job, the
    copy quarantined and repaired by the repair sensor) attempted nothing: not a failed
    attempt of the work, so neither a back-off nor an escalation follows from it."""
    if tags is None:
        tags = {PACKAGE_DIM: package, SITE_DIM: site} if site else {PARTITION: package}
    records = [r for job in jobs_of(stage)
               for r in instance.get_run_records(RunsFilter(job_name=job, tags=tags), limit=200)]
    records += [r for r in instance.get_run_records(  # the UI's "Materialize", a backfill
        RunsFilter(job_name=IMPLICIT_ASSET_JOB_NAME, tags=tags), limit=200)
        if stage in stages_of(r.dagster_run)]
    return [outcome(r) for r in sorted(records, key=lambda r: r.create_timestamp)
            if not (r.dagster_run.status in FAILED and (
                checks_alone(instance, r.dagster_run)
                or not _failed_in(instance, r.dagster_run, stage)))]


def _failed_in(instance: DagsterInstance, run: DagsterRun, stage: Stage) -> bool:
    """Whether a failed run failed in `stage`. A run that does several stages (a copy with its
    archiving) stopped in one of them: the first whose step began and did not finish, else
    the first none of whose steps finished (no step began: its first). One that failed, or
    died, in the copy never began the archiving, one that failed in the archiving had done
    the copy: neither is a failed attempt of the other stage (counted so, one disk-full copy
    was escalated and told twice, as the copy and as its archiving)."""
    stages = stages_of(run)
    if len(stages) < 2:
        return True
    started: set[Stage] = set()
    finished: set[Stage] = set()
    for event in instance.get_records_for_run(
            run.run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS},
            limit=1000).records:
        entry = event.event_log_entry
        step_stage = ASSET_STAGE.get(entry.step_key or "")
        if entry.dagster_event is None or step_stage is None:
            continue
        if entry.dagster_event.event_type == DagsterEventType.STEP_START:
            started.add(step_stage)
        else:
            finished.add(step_stage)
    stopped = next((s for s in stages if s in started and s not in finished),
                   next((s for s in stages if s not in finished), stages[-1]))
    return stopped == stage


def outcome(record_: RunRecord) -> RunOutcome:
    run = record_.dagster_run
    ended = record_.end_time
    return RunOutcome(run.run_id, in_flight=run.status in IN_FLIGHT,
                      failed=run.status == DagsterRunStatus.FAILURE,
                      canceled=run.status == DagsterRunStatus.CANCELED,
                      stopped=(run.status == DagsterRunStatus.CANCELED
                               and bool(run.tags.get(STOPPED_TAG))),
                      ended_at=(_from_epoch(ended) if ended else record_.update_timestamp),
                      operator=bool(run.tags.get(RETRY_TAG)),
                      again=bool(run.tags.get(AGAIN_TAG)))


def _from_epoch(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def next_at_cursor(decisions: list[Decision],
                   sweep: tuple[datetime, str] | None = None) -> str:
    """The earliest back-off end (for `drive`), and where the sweep for unattended work is."""
    waits = [d.next_at.timestamp() for d in decisions
             if d.state == State.WAITING and d.next_at is not None]
    swept = {SWEPT_AT: sweep[0].timestamp(), SWEPT_TO: sweep[1]} if sweep else {}
    return json.dumps({NEXT_AT: min(waits) if waits else None, **swept})


@sensor(jobs=[*(JOBS[stage] for stage in STAGES), site_copy.with_archive],
        minimum_interval_seconds=15,
        default_status=DefaultSensorStatus.RUNNING)
def reattempt_sensor(context: SensorEvaluationContext, deployment: Deployment) -> SensorResult:
    """Failed (or dead) packaging, transfer, archive and staging runs whose work OpsDB still
    shows as possible and not done: requested again once their back-off is over, with a new
    run key per attempt; escalated past the horizon. Runs an operator canceled too, after the
    back-off, but as no failed attempt: never escalated for it."""
    config, instance, now = deployment.config, context.instance, utcnow()
    backoff = Backoff.of(config)
    window = backoff.horizon + backoff.longest + timedelta(days=1)
    candidates: set[tuple[Stage, str, str]] = set()
    for run_record in instance.get_run_records(
            RunsFilter(statuses=FAILED, updated_after=now - window), limit=5000):
        candidates.update(_works_of(run_record))
    with deployment.opsdb.session() as session:  # as recorded: the runs may be deleted
        recorded = {(Stage(r.stage), r.package, r.site): as_recorded(r, now)
                    for r in waiting(session) if r.stage in STAGES}
    candidates |= set(recorded)
    by_package: dict[str, list[tuple[Stage, str]]] = defaultdict(list)
    for stage, package, site in candidates:
        by_package[package].append((stage, site))
    stalled = {(s.stage, s.package, s.site): s
               for s in stalled_work(deployment.opsdb, config, packages=sorted(by_package))}
    swept_at, swept_to, sweep = _sweep_due(
        read_cursor(context, _swept, NEVER_SWEPT, "sweeps for unattended work now, from the "
                    "first package"), config, now)
    unattended: list[tuple[Stalled, int]] = []
    idle: list[tuple[Stalled, Decision]] = []
    if sweep:
        unattended, idle, swept_to = _unattended(deployment, instance, now, swept_to,
                                                 candidates)
        if unattended:  # their next stages will be unattended too: the next tick sweeps again
            swept_at -= timedelta(seconds=config.settings.policies.unattended_after_s) / 4
    requests, works, decisions, in_flight = [], [], [], []
    for (stage, package, site) in sorted(candidates):
        item = stalled.get((stage, package, site))
        if item is None:
            continue  # done, or no longer possible: nothing to re-attempt
        outcomes = history(instance, stage, package, site)
        decision = carried_over(decide(outcomes, backoff, now), outcomes,
                                recorded.get((stage, package, site)))
        partition = f"{package}|{site}" if site else package
        if decision.state == State.IN_FLIGHT:
            in_flight.append((stage, partition))
            continue
        decisions.append(decision)
        works.append(Work(stage, partition, package, site, decision,
                          idle_error(decision, item.reason) if decision.idle else item.reason))
        if decision.state == State.DUE:
            requests.append(_request(deployment, stage, package, site, decision))
            context.log.info(f"re-attempt {decision.failures + 1} of {stage.label} "
                             f"{partition}: {item.reason}")
    for item, decision in idle:
        partition = f"{item.package}|{item.site}" if item.site else item.package
        works.append(Work(item.stage, partition, item.package, item.site, decision,
                          idle_error(decision, item.reason)))
    for item, runs in unattended:
        partition = f"{item.package}|{item.site}" if item.site else item.package
        requests.append(_request(deployment, item.stage, item.package, item.site,
                                 Decision(State.DUE, episode="unattended", failures=runs),
                                 again=True))
        context.log.warning(f"{item.stage.label} {partition} is due and no run has done it "
                            f"for {config.settings.policies.unattended_after_s:g} s: "
                            f"{item.reason}")
    with deployment.opsdb.session(undo=held(context, "reattempt_sensor")) as session:
        escalated = record(session, works, now, keep=in_flight, stages=STAGES)
        for row in escalated:
            if row.escalated_at is None:  # told, still re-attempted automatically
                context.log.warning(f"{Stage(row.stage).label} {row.partition}: "
                                    f"{stopped_reason(row.stopped_runs, row.stopped_since)}; "
                                    "a person is told, automatic attempts go on")
                continue
            context.log.warning(f"{Stage(row.stage).label} {row.partition}: {row.attempts} "
                                f"attempts failed since {row.first_failed_at:%Y-%m-%d %H:%M}; "
                                "escalated")
    return SensorResult(run_requests=requests,
                        cursor=next_at_cursor(decisions, sweep=(swept_at, swept_to)),
                        dynamic_partitions_requests=revived(context.instance, requests))


# The lifecycle sensor that asks for each stage's work: stopped by an operator (to hold that
# work), the sweep leaves the stage alone too.
ASKED_BY = {Stage.PACKAGING: "package_sensor", Stage.SITE_COPY: "site_copy_sensor",
            Stage.LTA_COPY: "lta_copy_sensor", Stage.STAGING: "staging_sensor"}


def _swept(cursor: str) -> tuple[datetime | None, str]:
    """The cursor read: when the last sweep for unattended work was, and the last package it
    looked at."""
    state = json_object(cursor)
    last, after = state.get(SWEPT_AT), state.get(SWEPT_TO, "")
    if not isinstance(after, str):
        raise TypeError(f"{SWEPT_TO} is not a package name: {after!r}")
    return (None if last is None else datetime.fromtimestamp(number(last), UTC)), after


def _sweep_due(swept: tuple[datetime | None, str], config: Config,
               now: datetime) -> tuple[datetime, str, bool]:
    """When the last sweep for unattended work was, the last package it looked at, and
    whether a sweep is due now: four times per `unattended_after_s`, not at every tick. A
    last sweep in the future (a cursor set by hand, a clock that was wrong) is not one: the
    sweep is due, not held back until then."""
    quiet = timedelta(seconds=config.settings.policies.unattended_after_s)
    last, after = swept
    if last is not None and timedelta(0) <= now - last < quiet / 4:
        return last, after, False
    return now, after, True


def _unattended(deployment: Deployment, instance: DagsterInstance, now: datetime,
                after: str, skip: set[tuple[Stage, str, str]]
                ) -> tuple[list[tuple[Stalled, int]], list[tuple[Stalled, Decision]], str]:
    """Work of a page of unfinished packages and staging requests (by name after `after`)
    that OpsDB shows as due and that no run has done for `unattended_after_s`: none in
    flight, none failing (the re-attempts' business), the newest ended that long ago, or none
    ever and the package is that old. Its run was never asked for: the sensors' cursors and
    run keys, kept in the Dagster instance, were past it (an OpsDB restored from an older
    backup). Each with its number of runs (a sweep's run key is new when the work had another
    run since); the work whose runs asked for again did nothing (`reattempt._idle`: a person
    is told, no run asked); and where the next sweep goes on ("" to start over)."""
    config = deployment.config
    quiet = timedelta(seconds=config.settings.policies.unattended_after_s)
    page = config.settings.policies.sensor_page_rows
    with deployment.opsdb.session() as session:
        created = unfinished(session, now - quiet, after, page)
    held = stopped_by_operator(instance)
    out, idle = [], []
    for item in stalled_work(deployment.opsdb, config, packages=sorted(created)):
        asker = ASKED_BY.get(item.stage)  # None: not a stage the sweep asks for
        if (item.stage, item.package, item.site) in skip or asker is None or asker in held:
            continue
        runs = history(instance, item.stage, item.package, item.site)
        decision = decide(runs, Backoff.of(config), now)
        if decision.idle:
            idle.append((item, decision))
        if decision.state != State.NONE:
            continue
        last = max((_aware(r.ended_at) for r in runs if r.ended_at), default=None)
        if (last or created[item.package]) + quiet <= now:
            out.append((item, len(runs)))
    return out, idle, (max(created) if len(created) == page else "")


def _request(deployment: Deployment, stage: Stage, package: str, site: str,
             decision: Decision, *, again: bool = False) -> RunRequest:
    config = deployment.config
    partition = f"{package}|{site}" if site else package
    key = decision.run_key(stage, partition)
    job = (copy_job(config) if stage == Stage.SITE_COPY else JOBS[stage]).name
    tags = {WORK_TAG: f"{stage}:{partition}", "ccat/attempt": str(decision.failures + 1),
            **({AGAIN_TAG: "1"} if again else {})}
    if stage == Stage.PACKAGING:
        return RunRequest(partition_key=package, run_key=key, job_name=job, tags=tags,
                          run_config=on_queue(config, packaging_queue(config)))
    if stage == Stage.STAGING:  # `package` is the request (its partition)
        with deployment.opsdb.session() as session:
            location = get_request(session, package).location
            queue = staging_queue(config, location.site.short_name, location.name)
        return RunRequest(partition_key=package, run_key=key, job_name=job, tags=tags,
                          run_config=on_queue(config, queue))
    queue = (archive_queue if stage == Stage.LTA_COPY else transfer_queue)(config, site)
    if stage == Stage.SITE_COPY:
        with deployment.opsdb.session() as session:
            source = replication_source(session, config, get_package(session, package), site)
            if source is not None:
                tags[LINK_TAG] = f"{source.location.site.short_name}->{site}"
    return RunRequest(partition_key=package_site_key(package, site), run_key=key,
                      job_name=job, tags=tags, run_config=on_queue(config, queue))

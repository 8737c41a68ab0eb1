"""Integrity findings made outside an asset's own run (the fixity scrub, the audit, a
deletion-time re-check) as check evaluations on exactly the partition they concern.

Dagster shows a partition's check as passed or failed only while the evaluation targets the
partition's latest materialization (`AssetCheckPartitionInfo.is_current`); an evaluation
without that target is history only, and the partition, the check list and the lineage node
keep saying "Passed". So every evaluation made here names the partition's latest
materialization: a copy found bad is red until a new materialization (the repair) and its
check say otherwise.

Dagster takes a partition's latest check execution to be the one created last, and a run's
check execution is created when the run is (planned), not when the check is evaluated. So an
evaluation made here after a run of the partition was created, however briefly before that
run materializes, outranks that run's own check: the repaired partition reads stale though its
check passed on the new copy. Whether such a run exists is looked at before writing (the
integrity sensor holds a finding back until its partition has no run in flight, and the
report looks again), but no look can exclude one created in between (the daemon or a drive
creates runs in another process); so the integrity sensor also looks for that outcome
afterwards (`buried_checks`) and says the run's own result again, on the materialization it
was made on."""

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    Config,
    DagsterEventType,
    DagsterInstance,
    EventLogRecord,
    Failure,
    OpExecutionContext,
    RunsFilter,
    job,
    op,
)
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.instance.utils import RUNLESS_RUN_ID
from dagster._core.storage.asset_check_execution_record import (
    AssetCheckExecutionRecordStatus,
    AssetCheckPartitionInfo,
)
from dagster._core.storage.dagster_run import FINISHED_STATUSES
from dagster._core.storage.event_log.base import PartitionKeyFilter
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
from dagster._core.storage.tags import PARENT_RUN_ID_TAG, SENSOR_NAME_TAG
from sqlalchemy import or_, select

from ccat_assets.inflight import in_flight
from ccat_assets.partitions import package_site_key
from ccat_assets.stages import ASSET_STAGE
from ccat_dt.opsdb.models import LocationType
from ccat_dt.packages import partition_problem
from ccat_dt.stages import Stage
from resources.deployment import Deployment

# stage -> (asset, its integrity check)
CHECKS = {"packages": ("packages", "package_checksum"),
          LocationType.BUFFER: ("site_copies", "site_copy_checksum"),
          LocationType.LONG_TERM_ARCHIVE: ("lta_copies", "lta_copy_checksum")}

# asset -> the checks a finding is reported as (the integrity sensor's), and the assets whose
# partitions are PACKAGE|SITE (the others' are PACKAGE)
REPORTED = {"raw_files": ("raw_files_present",), "packages": ("package_checksum",),
            "site_copies": ("site_copy_checksum",), "lta_copies": ("lta_copy_checksum",),
            "purge_status": ("deletion_certificates", "filed_bytes_safe")}
PER_SITE = (CHECKS[LocationType.BUFFER][0], CHECKS[LocationType.LONG_TERM_ARCHIVE][0])


def latest_materialization(instance: DagsterInstance, asset: str,
                           partition: str) -> EventLogRecord | None:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition]),
        limit=1).records
    return records[0] if records else None


def check_evaluation(instance: DagsterInstance, asset: str, check: str, partition: str, *,
                     passed: bool, description: str,
                     severity: AssetCheckSeverity = AssetCheckSeverity.ERROR,
                     metadata: dict[str, Any] | None = None,
                     latest: EventLogRecord | None = None) -> AssetCheckEvaluation:
    """An evaluation of `check` on `partition`, targeting its latest materialization
    (`latest`, when the caller has just read it)."""
    latest = latest or latest_materialization(instance, asset, partition)
    target = (AssetCheckEvaluationTargetMaterializationData(
        storage_id=latest.storage_id, run_id=latest.run_id,
        timestamp=latest.timestamp) if latest else None)
    return AssetCheckEvaluation(asset_key=AssetKey(asset), check_name=check, passed=passed,
                                description=description, partition=partition,
                                target_materialization_data=target, severity=severity,
                                metadata=metadata or {})


def copy_check_of(package: str, site: str, kind: LocationType,
                  observatory: bool) -> tuple[str, str, str]:
    """(asset, check, partition) of the integrity check of the stage a copy belongs to."""
    if observatory:
        asset, check = CHECKS["packages"]
        return asset, check, package
    asset, check = CHECKS[kind]
    return asset, check, str(package_site_key(package, site))


def copy_check(instance: DagsterInstance, package: str, site: str, kind: LocationType,
               observatory: bool, *, passed: bool, description: str,
               metadata: dict[str, Any] | None = None) -> AssetCheckEvaluation:
    """The evaluation of the integrity check of the stage a copy belongs to."""
    asset, check, partition = copy_check_of(package, site, kind, observatory)
    return check_evaluation(instance, asset, check, partition, passed=passed,
                            description=description, metadata=metadata)


def partition_busy(asset: str, partition: str,
                   busy: set[tuple[Stage, str, str | None]]) -> bool:
    """Whether a run in flight (`busy`: `in_flight`'s answer) materializes `partition` of
    `asset`: its check, planned when the run was created, is outranked by any evaluation
    written on the partition before it ends."""
    package, _, site = partition.partition("|")
    return (ASSET_STAGE[asset], package, site or None) in busy


class Also(Config):
    """Another check's evaluation on the materialization a finding restates."""

    check: str
    passed: bool
    description: str
    severity: str = AssetCheckSeverity.ERROR.value


class Finding(Config):
    """One check evaluation to report: on `partition` of `asset`, as it was when found."""

    asset: str
    check: str
    partition: str
    passed: bool
    description: str
    # the event log's newest record id when the sensor began to look at OpsDB: a later
    # materialization of the partition (a repair, a click) came with its own, newer check
    events_before: int
    severity: str = AssetCheckSeverity.ERROR.value
    # not a finding but a run's own check result said again (buried_checks): on this
    # materialization (storage id), if it is still the partition's latest
    restates: int = 0
    # a partition OpsDB holds done that Dagster shows no materialization of (wiped, or its
    # runs deleted): its materialization restated, with this metadata, before the evaluation
    materialize: dict[str, str] = {}
    # with `materialize`: the asset's other checks, evaluated on that materialization too
    also: list[Also] = []


class Findings(Config):
    findings: list[Finding]


def finding_problems(deployment: Deployment, findings: Sequence[Finding]) -> list[str]:
    """What is wrong with findings typed in by a person (the UI's Launchpad, `dagster job
    execute -c`), one line per bad finding: an asset or check a finding is not reported as,
    a partition naming nothing OpsDB and the config hold, an unknown severity, a negative
    event id. [] when all can be reported; any refuses the run whole, before any is logged."""
    severities = [severity.value for severity in AssetCheckSeverity]
    problems = []
    with deployment.opsdb.session() as session:
        for number, finding in enumerate(findings, 1):
            wrong = []
            checks = REPORTED.get(finding.asset)
            if checks is None:
                wrong.append(f"asset {finding.asset!r} is not one of {', '.join(REPORTED)}")
            else:
                wrong += [f"{check!r} is not a check of {finding.asset} ({', '.join(checks)})"
                          for check in (finding.check, *(a.check for a in finding.also))
                          if check not in checks]
                partition = partition_problem(session, deployment.config, finding.partition,
                                              per_site=finding.asset in PER_SITE)
                wrong += [partition] if partition is not None else []
            wrong += [f"severity {severity!r} is not {' or '.join(severities)}"
                      for severity in (finding.severity, *(a.severity for a in finding.also))
                      if severity not in severities]
            wrong += [f"{name} {value} is negative" for name, value in (
                ("events_before", finding.events_before), ("restates", finding.restates))
                if value < 0]
            if wrong:
                problems.append(f"finding {number} ({finding.asset} {finding.partition!r}): "
                                f"{', '.join(wrong)}")
    return problems


@op
def report_findings(context: OpExecutionContext, config: Findings,
                    deployment: Deployment) -> int:
    """Each finding as a check evaluation in this run. (A run, not the sensor's own
    `asset_events`: Dagster stores a runless evaluation of a partitioned check once per
    partition only, so a second finding on the same partition would fail the tick.)

    A partition materialized since the finding (the repair, a click on Materialize) carries
    its own check, made on the storage after the finding: reporting the finding on it would
    paint a repaired copy red. Such a finding is history and is only logged. The sensor holds
    a finding back while a run of its partition is in flight (`integrity_sensor`'s cursor);
    one whose partition a run created since that look is materializing is only logged too:
    that run's check, planned before this evaluation, would otherwise not count as the
    latest, and the repaired partition would show no check. Findings typed in by hand with a
    bad one are refused whole (`finding_problems`)."""
    problems = finding_problems(deployment, config.findings)
    if problems:
        raise Failure(description=(
            f"integrity_report_job: {len(problems)} of {len(config.findings)} findings "
            f"refused, nothing reported: {'; '.join(problems)}"), allow_retries=False)
    reported = 0
    busy = in_flight(context.instance)  # a run whose process died is closed, not counted
    for finding in config.findings:
        latest = latest_materialization(context.instance, finding.asset, finding.partition)
        if finding.materialize and latest is not None:
            context.log.info(f"{finding.asset} {finding.partition} materialized since; "
                             f"not restated from OpsDB: {finding.description}")
            continue
        if finding.restates and (latest is None or latest.storage_id != finding.restates):
            context.log.info(f"{finding.asset} {finding.partition} materialized again since; "
                             f"that run's check stands, not this one: {finding.description}")
            continue
        if (not finding.restates and latest is not None
                and latest.storage_id > finding.events_before):
            context.log.info(f"{finding.asset} {finding.partition} materialized since the "
                             f"finding, which is not reported: {finding.description}")
            continue
        if partition_busy(finding.asset, finding.partition, busy):
            context.log.info(f"{finding.asset} {finding.partition} is being materialized (a "
                             "run created since the sensor's look); not reported now, its "
                             f"check stands: {finding.description}")
            continue
        if finding.materialize:
            context.log_event(AssetMaterialization(
                finding.asset, partition=finding.partition, metadata=finding.materialize,
                description="restated from OpsDB: Dagster had no materialization of it (its "
                            "runs deleted, or its materializations wiped)"))
            latest = latest_materialization(context.instance, finding.asset, finding.partition)
        for check, passed, description, severity in [
                (finding.check, finding.passed, finding.description, finding.severity),
                *((a.check, a.passed, a.description, a.severity) for a in finding.also)]:
            context.log_event(check_evaluation(  # type: ignore[arg-type]  # accepted at runtime
                context.instance, finding.asset, check, finding.partition, passed=passed,
                description=description, severity=AssetCheckSeverity(severity), latest=latest))
        reported += 1
    return reported


LOOK_BACK = 50  # check executions of a partition looked through for a run's own


def _running(instance: DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is not None and run.status not in FINISHED_STATUSES


def _materialized_after(instance: DagsterInstance, asset: str, after: int
                        ) -> list[EventLogRecord]:
    """The materializations of `asset` after event `after`, oldest first."""
    records: list[EventLogRecord] = []
    cursor = None
    while True:
        page = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey(asset), after_storage_id=after),
            limit=1000, cursor=cursor, ascending=True)
        records += page.records
        if not page.has_more:
            return records
        cursor = page.cursor


def made_by_hand(instance: DagsterInstance, after: int,
                 checks: Mapping[str, Sequence[AssetCheckKey]]) -> dict[tuple[str, str], int]:
    """The partitions of these assets (asset -> its checks) given a materialization or a
    check evaluation by hand after event `after` (the UI's "Report materialization event",
    the Checks tab's "Report evaluation": runless events; ours are logged in runs), each with
    the storage id of its newest such event: their checks say nothing of the storage (stale,
    or whatever a person typed) until they are run again. The cost follows the events since
    `after`."""
    found: dict[tuple[str, str], int] = {}
    if not _runless_since(instance, after, checks):
        return found

    def add(asset: str, partition: str | None, storage_id: int) -> None:
        if partition is not None:
            found[asset, partition] = max(storage_id, found.get((asset, partition), 0))

    for asset, keys in checks.items():
        for record in _materialized_after(instance, asset, after):
            if record.run_id == RUNLESS_RUN_ID:
                add(asset, record.partition_key, record.storage_id)
        for info in (instance.event_log_storage.get_asset_check_partition_info(
                list(keys), after_storage_id=after) if keys else []):
            if (info.latest_planned_run_id == RUNLESS_RUN_ID
                    and info.latest_check_event_storage_id > after):
                add(asset, info.partition_key, info.latest_check_event_storage_id)
    return found


INTEGRITY_SENSOR = "integrity_sensor"  # the sensor whose findings integrity_report_job reports
CLOCK_SLACK_S = 60.0  # runs finished this long before the last look are looked at again


def reported_by_hand(instance: DagsterInstance, since: float | None
                     ) -> tuple[dict[tuple[str, str], str], float]:
    """The partitions whose checks an integrity_report_job run the integrity sensor did not
    ask for reported on, each with that run's id: launched from the Launchpad with findings
    typed in, or re-executed from the UI (an old finding said again). What such a run
    reports is a person's word or the past, not the storage's: the checks of those partitions
    are run again on the storage, as after "Report evaluation". Looks at the runs finished
    since `since` (epoch seconds; CLOCK_SLACK_S earlier, for another host's clock: a run
    looked at twice asks for the same rechecks, by run key; None: from now on), and returns
    when the newest of them finished, the next look's `since`."""
    found: dict[tuple[str, str], str] = {}
    finished = RunsFilter(job_name=integrity_report_job.name, statuses=list(FINISHED_STATUSES))
    if since is None:
        newest = instance.get_run_records(finished, limit=1)
        return found, newest[0].update_timestamp.timestamp() if newest else 0.0
    mark = since
    for record in instance.get_run_records(RunsFilter(
            job_name=finished.job_name, statuses=finished.statuses,
            updated_after=datetime.fromtimestamp(since - CLOCK_SLACK_S, UTC))):
        mark = max(mark, record.update_timestamp.timestamp())
        tags = record.dagster_run.tags
        if tags.get(SENSOR_NAME_TAG) == INTEGRITY_SENSOR and PARENT_RUN_ID_TAG not in tags:
            continue  # the sensor's own: its findings are the OpsDB's and the storage's
        for event in instance.get_records_for_run(
                record.dagster_run.run_id,
                of_type=DagsterEventType.ASSET_CHECK_EVALUATION).records:
            evaluation = event.event_log_entry.asset_check_evaluation
            if evaluation is not None and evaluation.partition is not None:
                found[evaluation.asset_key.to_user_string(), str(evaluation.partition)] = \
                    record.dagster_run.run_id
    return found, mark


def _runless_since(instance: DagsterInstance, after: int, assets: Iterable[str]) -> bool:
    """Whether any of these assets was given a materialization or any check an evaluation by
    hand after event `after` (the operator overview's runless materializations are not):
    one indexed query over the events since. Without it, each tick asked Dagster for every
    check's partitions, a grouping over each check's whole history (27 ms a tick on the
    demo's instance, and growing with the archive) to find, nearly always, nothing."""
    storage = instance.event_log_storage
    if not isinstance(storage, SqlEventLogStorage):
        return True
    events = SqlEventLogStorageTable.c
    query = select(events.id).where(
        events.id > after, events.run_id == RUNLESS_RUN_ID, or_(
            events.dagster_event_type == DagsterEventType.ASSET_CHECK_EVALUATION.value,
            (events.dagster_event_type == DagsterEventType.ASSET_MATERIALIZATION.value)
            & events.asset_key.in_([AssetKey(asset).to_string() for asset in assets]))).limit(1)
    with storage.index_connection() as connection:
        return connection.execute(query).first() is not None


def last_wiped(instance: DagsterInstance, assets: Iterable[str]) -> float:
    """When the materializations of one of these assets were last wiped ("Wipe
    materializations", the UI's wipeAssets), in epoch seconds; 0.0 if never. Dagster keeps it
    with each asset's key (one row per asset: one query); neither its asset records (they
    leave a wiped asset out) nor its ASSET_WIPED event (the embedded SQLite storage keeps it
    with the runless events, outside its index) can tell."""
    storage = instance.event_log_storage
    details_of = getattr(storage, "_get_assets_details", None)  # Dagster's own, not public
    if not isinstance(storage, SqlEventLogStorage) or details_of is None:
        return 0.0  # the slow round restates
    details = details_of([AssetKey(asset) for asset in assets])
    return max((d.last_wipe_timestamp or 0.0 for d in details if d is not None), default=0.0)


def buried_checks(instance: DagsterInstance, after: int, pending: list[list[str]]
                  ) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """The partitions, among those materialized after event `after` (only a new
    materialization can be outranked) and those `pending`, whose latest materialization's own
    check (in the run that made it) is outranked by an evaluation another run made later on an
    older materialization (a finding or a scrub result written while that run was in flight):
    that check's result, to be said again (a Finding's fields, `restates` its
    materialization's storage id). Also the partitions [asset, check, partition] to look at
    again at the next tick: their run's check was not evaluated yet. The cost follows the
    materializations since the last tick, not the history."""
    storage = instance.event_log_storage
    infos: list[AssetCheckPartitionInfo] = []
    for asset, check in CHECKS.values():
        key = AssetCheckKey(AssetKey(asset), check)
        touched = {key_ for a, c, key_ in pending if (a, c) == (asset, check)}
        touched |= {r.partition_key for r in _materialized_after(instance, asset, after)
                    if r.partition_key}
        if touched:
            infos += storage.get_asset_check_partition_info([key], partition_keys=sorted(touched))
    restated: list[dict[str, Any]] = []
    waiting: list[list[str]] = []
    seen: set[tuple[AssetCheckKey, str]] = set()
    for info in infos:
        partition = info.partition_key
        if info.is_current or partition is None or (info.check_key, partition) in seen:
            continue
        seen.add((info.check_key, partition))
        asset, check = info.check_key.asset_key.to_user_string(), info.check_key.name
        latest = latest_materialization(instance, asset, partition)
        if latest is None:
            continue
        if latest.run_id == info.latest_planned_run_id:
            # That run's own execution is the latest, not evaluated yet: watched until it is
            # (an evaluation written meanwhile would outrank it).
            if (info.latest_execution_status == AssetCheckExecutionRecordStatus.PLANNED
                    and _running(instance, latest.run_id)):
                waiting.append([asset, check, partition])
            continue
        own = next((r for r in storage.get_asset_check_execution_history(
            info.check_key, limit=LOOK_BACK, partition_filter=PartitionKeyFilter(key=partition))
            if r.run_id == latest.run_id), None)
        if own is None:
            continue  # that run had no such check (or it is long outranked: not ours to say)
        if own.status == AssetCheckExecutionRecordStatus.PLANNED:
            if _running(instance, latest.run_id):
                waiting.append([asset, check, partition])
            continue
        evaluation = own.event.dagster_event.event_specific_data if (
            own.event and own.event.dagster_event) else None
        if (not isinstance(evaluation, AssetCheckEvaluation)
                or evaluation.target_materialization_data is None
                or evaluation.target_materialization_data.storage_id != latest.storage_id):
            continue
        restated.append({
            "asset": asset, "check": check, "partition": partition,
            "passed": evaluation.passed,
            "description": f"{evaluation.description or ''} (the check of run "
                           f"{latest.run_id[:8]}, said again: an evaluation on the previous "
                           "materialization came after it)",
            "severity": evaluation.severity.value, "restates": latest.storage_id,
            "events_before": info.latest_check_event_storage_id})
    return restated, waiting


@job
def integrity_report_job() -> None:
    report_findings()

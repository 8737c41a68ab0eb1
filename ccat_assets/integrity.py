"""Integrity findings made outside an asset's own run (the fixity scrub, the audit, a
deletion-time re-check) as check evaluations on exactly the partition they concern.

Dagster shows a partition's check as passed or failed only while the evaluation targets the
partition's latest materialization (`AssetCheckPartitionInfo.is_current`); an evaluation
without that target is history only, and the partition, the check list and the lineage node
keep saying "Passed". So every evaluation made here names the partition's latest
materialization: a copy found bad is red until a new materialization (the repair) and its
check say otherwise."""

from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetKey,
    AssetRecordsFilter,
    Config,
    DagsterInstance,
    EventLogRecord,
    OpExecutionContext,
    job,
    op,
)
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

from ccat_assets.inflight import in_flight
from ccat_assets.partitions import package_site_key
from ccat_assets.stages import ASSET_STAGE
from ccat_dt.opsdb.models import LocationType

# stage -> (asset, its integrity check)
CHECKS = {"packages": ("packages", "package_checksum"),
          LocationType.BUFFER: ("site_copies", "site_copy_checksum"),
          LocationType.LONG_TERM_ARCHIVE: ("lta_copies", "lta_copy_checksum")}


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


class Findings(Config):
    findings: list[Finding]


@op
def report_findings(context: OpExecutionContext, config: Findings) -> int:
    """Each finding as a check evaluation in this run. (A run, not the sensor's own
    `asset_events`: Dagster stores a runless evaluation of a partitioned check once per
    partition only, so a second finding on the same partition would fail the tick.)

    A partition materialized since the finding (the repair, a click on Materialize) carries
    its own check, made on the storage after the finding: reporting the finding on it would
    paint a repaired copy red. Such a finding is history and is only logged; so is one whose
    partition a run is materializing now: that run's check, planned before this evaluation,
    would otherwise not count as the latest, and the repaired partition would show no check."""
    reported = 0
    busy = in_flight(context.instance)  # a run whose process died is closed, not counted
    for finding in config.findings:
        latest = latest_materialization(context.instance, finding.asset, finding.partition)
        if latest is not None and latest.storage_id > finding.events_before:
            context.log.info(f"{finding.asset} {finding.partition} materialized since the "
                             f"finding, which is not reported: {finding.description}")
            continue
        package, _, site = finding.partition.partition("|")
        if (ASSET_STAGE[finding.asset], package, site or None) in busy:
            context.log.info(f"{finding.asset} {finding.partition} is being materialized; its "
                             f"own check reports it, not this finding: {finding.description}")
            continue
        context.log_event(check_evaluation(  # type: ignore[arg-type]  # accepted at runtime
            context.instance, finding.asset, finding.check, finding.partition,
            passed=finding.passed, description=finding.description,
            severity=AssetCheckSeverity(finding.severity), latest=latest))
        reported += 1
    return reported


@job
def integrity_report_job() -> None:
    report_findings()

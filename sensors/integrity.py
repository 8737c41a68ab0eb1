"""Integrity findings made outside an asset's run (the audit's `--repair`, a deletion-time
re-check, a copy found bad while being re-read) reach the UI as check evaluations on exactly
the partition concerned, and `filed_bytes_safe` follows a package at risk until it is safe.
A partition given a materialization or a check evaluation by hand (runless: the UI's "Report
materialization event" or "Report evaluation") has its checks run again, alone, on the storage.
A finding already repaired when the sensor sees it, or by the time its report runs, is not
reported (the repair's own check said green). A repair's check that a finding outranked all
the same (written while the repair was in flight) is said again (`buried_checks`). The
evaluations are logged by a small run (`integrity_report_job`)."""

import hashlib
import json
from typing import Any

from dagster import (
    AssetCheckSeverity,
    AssetKey,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from ccat_assets.integrity import buried_checks, copy_check_of, integrity_report_job, made_by_hand
from ccat_assets.partitions import (
    package_partitions,
    package_site_key,
    split_key,
    staging_partitions,
)
from ccat_assets.stages import ASSET_STAGE, JOBS
from ccat_dt.loss import Health, assess
from ccat_dt.packages import get_package
from ccat_dt.pending import quarantines_found
from ccat_dt.stages import Stage
from resources.deployment import Deployment


@sensor(jobs=[integrity_report_job, *JOBS.values()], minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING)
def integrity_sensor(context: SensorEvaluationContext, deployment: Deployment) -> SensorResult:
    state = json.loads(context.cursor) if context.cursor else {}
    after, was_unsafe = int(state.get("op", 0)), list(state.get("unsafe", []))
    findings: list[dict[str, Any]] = []
    config = deployment.config
    # Read before OpsDB: a repair verified after this id was taken either shows in OpsDB now
    # (no finding) or materializes after it (its report is then skipped, see report_findings).
    events_before = context.instance.event_log_storage.get_maximum_record_id() or 0
    # Checks and materializations since the last tick (a first tick: from now on).
    since = int(state.get("checks", events_before))
    restated, pending = buried_checks(context.instance, since, list(state.get("pending", [])))
    rechecks = _rechecks(context, since)
    with deployment.opsdb.session() as session:
        found, cursor = quarantines_found(session, config, after)
        for q in found:
            asset, check, partition = copy_check_of(q.package, q.site, q.kind, q.observatory)
            findings.append({"asset": asset, "check": check, "partition": partition,
                             "passed": False, "description": q.description})
        watched = sorted({*was_unsafe, *(q.package for q in found)})
        unsafe = []
        for name in watched:
            try:
                assessment = assess(session, config, get_package(session, name))
            except LookupError:
                continue
            safe = assessment.health == Health.SAFE
            if not safe:
                unsafe.append(name)
            if safe and name not in was_unsafe and not found:
                continue
            findings.append({
                "asset": "purge_status", "check": "filed_bytes_safe", "partition": name,
                "passed": safe, "description": assessment.reason,
                "severity": (AssetCheckSeverity.ERROR if assessment.health == Health.LOST
                             else AssetCheckSeverity.WARN).value})
    for finding in findings:
        finding["events_before"] = events_before
    new_cursor = json.dumps({"op": cursor, "unsafe": unsafe, "checks": events_before,
                             "pending": pending})
    requests = []
    if findings and (found or sorted(unsafe) != sorted(was_unsafe)):
        requests.append(RunRequest(
            job_name=integrity_report_job.name,
            run_key=f"integrity:{after}:{cursor}:{','.join(unsafe)}"[:200],
            run_config={"ops": {"report_findings": {"config": {"findings": findings}}}}))
    if restated:  # once per evaluation that outranked a check (its storage id)
        over = ",".join(str(r["events_before"]) for r in restated)
        requests.append(RunRequest(
            job_name=integrity_report_job.name,
            run_key=f"integrity-restate:{hashlib.sha256(over.encode()).hexdigest()[:16]}",
            run_config={"ops": {"report_findings": {"config": {"findings": restated}}}}))
    requests += rechecks
    if not requests:
        return SensorResult(cursor=new_cursor, skip_reason="no new integrity finding")
    return SensorResult(cursor=new_cursor, run_requests=requests)


def _rechecks(context: SensorEvaluationContext, since: int) -> list[RunRequest]:
    """For each partition of a lifecycle asset given an event by hand since event `since`, a
    run of its checks alone (they read the copy on its storage and report on the latest
    materialization, the hand-made one); once per such event (its storage id)."""
    assert context.repository_def is not None
    graph = context.repository_def.asset_graph
    checks = {asset: list(graph.get_check_keys_for_assets({AssetKey(asset)}))
              for asset in ASSET_STAGE}
    requests = []
    for (asset, key), event in sorted(made_by_hand(context.instance, since, checks).items()):
        stage = ASSET_STAGE[asset]
        dynamic = staging_partitions if stage == Stage.STAGING else package_partitions
        assert dynamic.name is not None
        if not context.instance.has_dynamic_partition(dynamic.name, key.split("|", 1)[0]):
            continue  # retired since (sensors/retire.py): a run of it cannot be asked for
        requests.append(RunRequest(
            job_name=JOBS[stage].name, asset_selection=[], asset_check_keys=checks[asset],
            run_key=f"recheck:{asset}:{key}:{event}",
            partition_key=package_site_key(*split_key(key)) if "|" in key else key))
    return requests


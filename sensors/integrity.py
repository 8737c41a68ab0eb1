"""Integrity findings made outside an asset's run (the audit's `--repair`, a deletion-time
re-check, a copy found bad while being re-read) reach the UI as check evaluations on exactly
the partition concerned, and `filed_bytes_safe` follows a package at risk until it is safe.
A partition given a materialization or a check evaluation by hand (runless: the UI's "Report
materialization event" or "Report evaluation") has its checks run again, alone, on the storage.
A copy OpsDB holds verified whose partition Dagster shows no materialization of ("Wipe
materializations") is restated from OpsDB, on a slow round (`restatements`).
A finding already repaired when the sensor sees it, or by the time its report runs, is not
reported (the repair's own check said green). A repair's check that a finding outranked all
the same (written while the repair was in flight) is said again (`buried_checks`). The
evaluations are logged by a small run (`integrity_report_job`)."""

import hashlib
import json
import time
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
    PACKAGES,
    package_partitions,
    package_site_key,
    split_key,
    staging_partitions,
)
from ccat_assets.stages import ASSET_STAGE, JOBS
from ccat_dt.config import Config
from ccat_dt.loss import Health, assess
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import LocationType
from ccat_dt.packages import get_package
from ccat_dt.pending import quarantines_found
from ccat_dt.recorded import Verified, verifications, verified_placements
from ccat_dt.stages import Stage
from resources.deployment import Deployment

# How often what Dagster shows materialized is compared with what OpsDB holds verified (a
# query per asset and one of OpsDB, each of every partition: not at every tick), and how many
# partitions one report restates (the rest at the next tick).
RESTATE_EVERY_S = 600.0
RESTATE_BATCH = 500


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
    now, restated_at = time.time(), float(state.get("restated_at", time.time()))
    told: list[dict[str, Any]] = []
    more = bool(state.get("more"))
    if more or now - restated_at >= RESTATE_EVERY_S:
        told, more = restatements(context, deployment.opsdb, config)
        restated_at = now
    for finding in (*findings, *told):
        finding["events_before"] = events_before
    new_cursor = json.dumps({"op": cursor, "unsafe": unsafe, "checks": events_before,
                             "pending": pending, "restated_at": restated_at, "more": more})
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
    if told:  # once per round (the previous round's time) and partitions
        over = ",".join(f"{t['asset']}:{t['partition']}" for t in told)
        requests.append(RunRequest(
            job_name=integrity_report_job.name,
            run_key=f"integrity-opsdb:{state.get('restated_at', 0)}:"
                    f"{hashlib.sha256(over.encode()).hexdigest()[:16]}",
            run_config={"ops": {"report_findings": {"config": {"findings": told}}}}))
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



def restatements(context: SensorEvaluationContext, opsdb: OpsDB,
                 config: Config) -> tuple[list[dict[str, Any]], bool]:
    """The live partitions of packages, site copies and LTA copies that OpsDB holds a verified
    copy for and Dagster shows no materialization of, as findings that restate both from
    OpsDB (at most RESTATE_BATCH), and whether more are left. Sets are compared, one query
    each; the copies are not read (that would be the whole archive)."""
    instance = context.instance
    live = set(instance.get_dynamic_partitions(PACKAGES))
    observatory = config.settings.observatory
    sites = {site.short_name for site in config.settings.archive_sites}
    with opsdb.session() as session:
        placed = {copy_check_of(package, site, kind, site == observatory): (package, site, kind)
                  for package, site, kind in verified_placements(session)
                  if package in live and (site in sites or (
                      site == observatory and kind == LocationType.BUFFER))}
        shown = {asset: instance.get_materialized_partitions(AssetKey(asset))
                 for asset in {asset for asset, _, _ in placed}}
        missing = sorted(key for key in placed if key[2] not in shown[key[0]])
        found = {(v.package, v.site, v.kind): v for v in verifications(
            session, [placed[key] for key in missing[:RESTATE_BATCH]])}
    return [_restated(asset, check, partition, found[placed[asset, check, partition]])
            for asset, check, partition in missing[:RESTATE_BATCH]
            if placed[asset, check, partition] in found], len(missing) > RESTATE_BATCH


def _restated(asset: str, check: str, partition: str, copy: Verified) -> dict[str, Any]:
    by = (f" by {copy.verified_by} (operation {copy.operation_id})" if copy.operation_id
          else " (no read of it recorded)")
    again = ("the fixity scrub re-reads it" if copy.kind == LocationType.LONG_TERM_ARCHIVE
             else "Materialize on the partition re-reads it")
    return {"asset": asset, "check": check, "partition": partition, "passed": True,
            "description": f"restated from OpsDB: verified {copy.verified_at:%Y-%m-%d %H:%M:%S}"
                           f" UTC{by}; not re-read now, {again}",
            "materialize": {"restated_from": "OpsDB", "copy_id": str(copy.copy_id),
                            "verified_at": copy.verified_at.isoformat(),
                            "verified_by": copy.verified_by or "",
                            "operation_id": str(copy.operation_id or "")}}

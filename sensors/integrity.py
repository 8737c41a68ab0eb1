"""Integrity findings made outside an asset's run (the audit's `--repair`, a deletion-time
re-check, a copy found bad while being re-read) reach the UI as check evaluations on exactly
the partition concerned, and `filed_bytes_safe` follows a package at risk until it is safe.
A partition given a materialization or a check evaluation by hand (runless: the UI's "Report
materialization event" or "Report evaluation") has its checks run again, alone, on the storage;
a copy stage's partition of which OpsDB records no copy there at all (work not done yet) is
told so, a warning, without a run.
A partition OpsDB holds done (a package built, a copy verified, present or deleted by the
purge since, a package's purge; a copy quarantined since, not yet made again: with its check
failed) that Dagster shows no materialization of ("Wipe materializations", or its runs
deleted: Runs → Delete deletes a run's event log) is restated from OpsDB, on a slow round,
and at the next tick after runs were deleted (`runs_deleted`, `restatements`) or an asset was
wiped (`last_wiped`); not while a run of it is in flight (it waits for that run's end, and is
dropped if that run materialized it).
A finding whose partition has a run in flight (the run that found the copy bad, a repair) is
held back in the cursor, as it was found, and reported once no run of the partition is in
flight: written meanwhile it would outrank that run's own check. A finding already repaired
when the sensor sees it, by the time it is no longer held back, or by the time its report runs,
is not reported (the repair's own check said green). A repair's check that a finding outranked
all the same (written while the repair was in flight) is said again (`buried_checks`). The
evaluations are logged by a small run (`integrity_report_job`)."""

import hashlib
import json
import time
from datetime import datetime, timedelta
from typing import Any

from dagster import (
    AssetCheckSeverity,
    AssetKey,
    DagsterInstance,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from ccat_assets.inflight import in_flight
from ccat_assets.integrity import (
    INTEGRITY_SENSOR,
    buried_checks,
    copy_check_of,
    integrity_report_job,
    last_wiped,
    latest_materialization,
    made_by_hand,
    partition_busy,
    reported_by_hand,
)
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
from ccat_dt.reaper import certificate_problems
from ccat_dt.recorded import (
    Built,
    Purged,
    Quarantined,
    Verified,
    builds,
    built_packages,
    purged_packages,
    purged_placements,
    purges,
    quarantined_placements,
    quarantines,
    verifications,
    verified_placements,
)
from ccat_dt.replicas import none_recorded
from ccat_dt.stages import Stage
from resources.deployment import Deployment
from sensors.cursor import json_object, number, read_cursor

# How often what Dagster shows materialized is compared with what OpsDB holds done (a query
# per asset and a few of OpsDB, each of every partition: not at every tick, only on this
# round, after runs were deleted, and when a partition left waiting for its run's end is free),
# and how many partitions one report restates (the rest at the next tick).
RESTATE_EVERY_S = 600.0
RESTATE_BATCH = 500
# Findings held back in the cursor at most (one per check and partition with a run in flight);
# the oldest beyond are reported at once (their report looks again, and logs one still busy).
HELD_MAX = 1000


@sensor(name=INTEGRITY_SENSOR, jobs=[integrity_report_job, *JOBS.values()],
        minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING)
def integrity_sensor(context: SensorEvaluationContext, deployment: Deployment) -> SensorResult:
    state = read_cursor(context, _state, dict[str, Any](),
                        "reports what OpsDB holds quarantined now, and the checks from now on")
    after, was_unsafe = int(state.get("op", 0)), list(state.get("unsafe", []))
    findings: list[dict[str, Any]] = []
    config = deployment.config
    # Read before OpsDB: a repair verified after this id was taken either shows in OpsDB now
    # (no finding) or materializes after it (its report is then skipped, see report_findings).
    events_before = context.instance.event_log_storage.get_maximum_record_id() or 0
    # Checks and materializations since the last tick (a first tick: from now on).
    since = min(int(state.get("checks", events_before)), events_before)  # none ahead (by hand)
    restated, pending = buried_checks(context.instance, since, list(state.get("pending", [])))
    rechecks, unbacked, by_hand, typed = _rechecks(context, deployment, since,
                                                   state.get("typed"))
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
    now = time.time()
    restated_at = min(float(state.get("restated_at", now)), now)  # not held off by a future
    told: list[dict[str, Any]] = []
    more = bool(state.get("more"))
    runs, deleted = runs_deleted(context.instance, state.get("runs"))
    waiting = still_waiting(context.instance, list(state.get("waiting", [])))
    # "Wipe materializations" since the last tick: the partitions OpsDB holds done are
    # restated now, not at the slow round (a first tick only notes when the last was).
    wiped = last_wiped(context.instance, ASSET_STAGE)
    if more or deleted or wiped > float(state.get("wiped", wiped)) or (
            now - restated_at >= RESTATE_EVERY_S) or any(not busy for *_, busy in waiting):
        told, more, waiting = restatements(context, deployment.opsdb, config, events_before)
        restated_at = now
    for finding in (*findings, *told, *unbacked):
        finding["events_before"] = events_before
    new = [*(findings if found or sorted(unsafe) != sorted(was_unsafe) else []), *unbacked]
    fresh, released, held = held_back(context.instance, new, list(state.get("held", [])))
    new_cursor = json.dumps({"op": cursor, "unsafe": unsafe, "checks": events_before,
                             "pending": pending, "restated_at": restated_at, "more": more,
                             "held": held, "runs": runs, "wiped": wiped, "typed": typed,
                             "waiting": [[asset, partition, found]
                                         for asset, partition, found, _ in waiting]})
    requests = []
    if fresh:
        # once per set of quarantines and unsafe packages, and of events made by hand
        hand = (f"hand-{hashlib.sha256(','.join(map(str, by_hand)).encode()).hexdigest()[:16]}:"
                if by_hand else "")
        requests.append(RunRequest(
            job_name=integrity_report_job.name,
            run_key=f"integrity:{after}:{cursor}:{hand}{','.join(unsafe)}"[:200],
            run_config={"ops": {"report_findings": {"config": {"findings": fresh}}}}))
    if released:  # once per set of findings released (each with the id it was found at)
        over = json.dumps(released, sort_keys=True)
        requests.append(RunRequest(
            job_name=integrity_report_job.name,
            run_key=f"integrity-held:{hashlib.sha256(over.encode()).hexdigest()[:16]}",
            run_config={"ops": {"report_findings": {"config": {"findings": released}}}}))
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


def _state(cursor: str) -> dict[str, Any]:
    """The cursor read, each entry of the type the sensor uses, else ValueError/TypeError."""
    state = json_object(cursor)
    for key in ("op", "checks"):
        if key in state and (isinstance(state[key], bool) or not isinstance(state[key], int)):
            raise TypeError(f"{key} is not an id: {state[key]!r}")
    for key in ("restated_at", "wiped", "typed"):
        if key in state:
            number(state[key])
    if "runs" in state:
        count, newest = state["runs"]  # ValueError/TypeError unless a pair
        if isinstance(count, bool) or not isinstance(count, int) or not (
                newest is None or isinstance(newest, str)):
            raise TypeError(f"runs is not [count, newest creation]: {state['runs']!r}"[:200])
        if newest is not None:
            datetime.fromisoformat(newest)
    if not isinstance(state.get("waiting", []), list) or any(
            not isinstance(item, list) or len(item) != 3 or item[0] not in ASSET_STAGE
            or not isinstance(item[1], str) or isinstance(item[2], bool)
            or not isinstance(item[2], int) for item in state.get("waiting", [])):
        raise ValueError("waiting is not a list of [asset, partition, event id]")
    for key, kind in (("unsafe", str), ("pending", list), ("held", dict)):
        if not isinstance(state.get(key, []), list) or not all(
                isinstance(item, kind) for item in state.get(key, [])):
            raise TypeError(f"{key} is not a list of {kind.__name__}: {state[key]!r}"[:200])
    if any(len(item) != 3 or not all(isinstance(part, str) for part in item)
           for item in state.get("pending", [])):
        raise ValueError("pending is not a list of [asset, check, partition]")
    for finding in state.get("held", []):
        missing = {"asset", "check", "partition", "events_before"} - finding.keys()
        if missing:
            raise KeyError(f"a held finding without {', '.join(sorted(missing))}")
        if finding["asset"] not in ASSET_STAGE or not isinstance(finding["partition"], str):
            raise ValueError(f"a held finding of no lifecycle asset's partition: "
                             f"{finding['asset']!r}, {finding['partition']!r}"[:200])
    return state


def held_back(instance: DagsterInstance, new: list[dict[str, Any]],
              held: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                   list[dict[str, Any]]]:
    """Of the findings `new` at this tick and those `held` at earlier ones: the new ones to
    report now, the held ones released now, and those to hold (in the cursor): their partition
    has a run in flight, whose check a finding written now would outrank (the repaired
    partition would read stale). A held finding whose partition was materialized since it was
    found is dropped: that run's own check stands. One per check and partition, the newest,
    HELD_MAX at most (the oldest beyond are released)."""
    if not new and not held:
        return [], [], []  # the runs in flight are not looked at (a query per run) for nothing
    busy = in_flight(instance)
    fresh, released, keep = [], [], {}
    for finding in held:
        latest = latest_materialization(instance, finding["asset"], finding["partition"])
        if latest is not None and latest.storage_id > finding["events_before"]:
            continue
        if partition_busy(finding["asset"], finding["partition"], busy):
            keep[finding["asset"], finding["check"], finding["partition"]] = finding
        else:
            released.append(finding)
    for finding in new:
        if partition_busy(finding["asset"], finding["partition"], busy):
            key = (finding["asset"], finding["check"], finding["partition"])
            keep.pop(key, None)  # the newer finding, last
            keep[key] = finding
        else:
            fresh.append(finding)
    kept = list(keep.values())
    return fresh, released + kept[:-HELD_MAX], kept[-HELD_MAX:]


# a copy stage's asset -> the kind of location its copies are at (its check reads them)
COPY_KIND = {"packages": LocationType.BUFFER, "site_copies": LocationType.BUFFER,
             "lta_copies": LocationType.LONG_TERM_ARCHIVE}


def _rechecks(context: SensorEvaluationContext, deployment: Deployment, since: int,
              typed_since: float | None
              ) -> tuple[list[RunRequest], list[dict[str, Any]], list[str], float]:
    """For each partition of a lifecycle asset given an event by hand since event `since`,
    or whose check an integrity_report_job run the sensor did not ask for reported on (typed
    in, re-executed) since `typed_since`, a run of its checks alone (they read the copy on its
    storage and report on the latest materialization, the hand-made one); once per such event
    (its storage id) or run (its id).

    Not for a copy stage's partition of which OpsDB records no copy there at all (a
    materialization reported for work not done yet): its check would read nothing and say
    so, failing its run (the check is blocking). That failed run counted as a failed attempt
    of the work, and while it was queued or running the stage's sensor left the work itself
    out ("a run of the partition is in flight") and moved on: the copy waited for the
    re-attempt's back-off, and `drive` ended with failed runs. What the check would say is
    told as a finding instead, a warning (the data is as it was; the event is not backed by a
    copy): the partition shows that until the work's own run materializes it. Likewise for
    purge_status of a package OpsDB records no deletion of (`_purge_not_recorded`).
    Returns the runs, those findings, the storage ids of the events (the ids of the runs)
    they answer, and `typed_since` for the next tick."""
    assert context.repository_def is not None
    graph = context.repository_def.asset_graph
    checks = {asset: list(graph.get_check_keys_for_assets({AssetKey(asset)}))
              for asset in ASSET_STAGE}
    observatory = deployment.config.settings.observatory
    requests, unbacked, events = [], [], []
    typed, typed_at = reported_by_hand(context.instance, typed_since)
    by_hand: dict[tuple[str, str], int | str] = {
        **typed, **made_by_hand(context.instance, since, checks)}
    for (asset, key), event in sorted(by_hand.items()):
        stage = ASSET_STAGE[asset]
        dynamic = staging_partitions if stage == Stage.STAGING else package_partitions
        assert dynamic.name is not None
        if not context.instance.has_dynamic_partition(dynamic.name, key.split("|", 1)[0]):
            continue  # retired since (sensors/retire.py): a run of it cannot be asked for
        if asset == PURGED[0] and (told := _purge_not_recorded(deployment, key)) is not None:
            unbacked.append(told)
            events.append(str(event))
            continue
        kind = COPY_KIND.get(asset)
        if kind is not None:
            package, _, site = key.partition("|")
            none = none_recorded(deployment.opsdb, package, site or observatory, kind)
            if none is not None:
                _, check, partition = copy_check_of(package, site or observatory, kind,
                                                    not site)
                unbacked.append({
                    "asset": asset, "check": check, "partition": partition, "passed": False,
                    "severity": AssetCheckSeverity.WARN.value,
                    "description": f"{none}: OpsDB records none, so the materialization "
                                   "reported by hand is not backed by a copy (nothing read); "
                                   "the sensors make the copy when it is due"})
                events.append(str(event))
                continue
        requests.append(RunRequest(
            job_name=JOBS[stage].name, asset_selection=[], asset_check_keys=checks[asset],
            run_key=f"recheck:{asset}:{key}:{event}",
            partition_key=package_site_key(*split_key(key)) if "|" in key else key))
    return requests, unbacked, events, typed_at


def _purge_not_recorded(deployment: Deployment, package: str) -> dict[str, Any] | None:
    """What purge_status's checks say of a package given a materialization by hand while
    OpsDB records no deletion of its copies (not purged: its sources and buffer copies kept):
    its checks run again would both pass (no deletion to certify; the filed bytes safe in the
    kept copies), a green purge that never happened. A warning on deletion_certificates
    instead, and filed_bytes_safe evaluated on OpsDB as its check does; no run. None when a
    deletion is recorded (the checks are run again), or the package is unknown."""
    with deployment.opsdb.session() as session:
        if purges(session, [package]):
            return None
        try:
            assessment = assess(session, deployment.config, get_package(session, package))
        except LookupError:
            return None
    return {"asset": PURGED[0], "check": PURGED[1], "partition": package, "passed": False,
            "severity": AssetCheckSeverity.WARN.value,
            "description": f"no purge of {package}: OpsDB records no deletion of its copies "
                           "(its sources and buffer copies are kept), so the materialization "
                           "reported by hand is not backed by a purge (nothing read); the "
                           "purge sensor's run purges it when its retention policy allows",
            "also": [{"check": "filed_bytes_safe", "passed": assessment.health == Health.SAFE,
                      "description": assessment.reason,
                      "severity": (AssetCheckSeverity.ERROR if assessment.health == Health.LOST
                                   else AssetCheckSeverity.WARN).value}]}



def runs_deleted(instance: DagsterInstance, seen: list[Any] | None
                 ) -> tuple[list[Any], bool]:
    """[how many runs were created until the newest, when that was (ISO)] now, and whether
    runs were deleted (Runs → Delete, which deletes their materializations) since `seen` (that
    pair at the last tick): fewer runs created until the newest then than then. Only the runs
    created until a given one are counted, so that a run created meanwhile (by another
    process, between two of these queries) is never taken for a deleted one. Two queries,
    three when runs were created since."""
    def created_until(newest: str) -> int:
        until = datetime.fromisoformat(newest) + timedelta(microseconds=1)
        return instance.get_runs_count(RunsFilter(created_before=until))

    count, newest = seen if seen else (0, None)
    left = created_until(newest) if newest is not None else 0
    deleted = left < count
    records = instance.get_run_records(limit=1)
    if not records:
        return [0, None], deleted
    now = records[0].create_timestamp.isoformat()
    return [left if now == newest else created_until(now), now], deleted


def still_waiting(instance: DagsterInstance, waiting: list[list[Any]]
                  ) -> list[tuple[str, str, int, bool]]:
    """Of the partitions left unrestated because a run of theirs was in flight ([asset,
    partition, the event id when found]), those not materialized since, each with whether a
    run of it is still in flight. A query per asset (the events since), and the runs in flight
    only while some wait."""
    if not waiting:
        return []
    since: dict[str, int] = {}
    for asset, _, found in waiting:
        since[asset] = min(found, since.get(asset, found))
    made = {asset: instance.get_materialized_partitions(AssetKey(asset), after_cursor=after)
            for asset, after in since.items()}
    left = [(asset, partition, found) for asset, partition, found in waiting
            if partition not in made[asset]]
    busy = in_flight(instance) if left else set()
    return [(asset, partition, found, partition_busy(asset, partition, busy))
            for asset, partition, found in left]


# (asset, its checks) restated from OpsDB per kind of record
BUILT = ("raw_files", "raw_files_present")
PURGED = ("purge_status", "deletion_certificates")


def restatements(context: SensorEvaluationContext, opsdb: OpsDB, config: Config,
                 events_before: int
                 ) -> tuple[list[dict[str, Any]], bool, list[tuple[str, str, int, bool]]]:
    """The live partitions that OpsDB holds done and Dagster shows no materialization of, as
    findings that restate the materialization and its checks from OpsDB (at most
    RESTATE_BATCH), whether more are left, and those left waiting: raw files of a package
    built, a package or a site copy verified (present, or deleted by the purge since), an LTA
    copy verified and present, a package the purge deleted copies of; and a copy quarantined
    with no verified copy there (found bad, not yet made again), its check failed as before
    the wipe. Sets are compared, one query each; the copies are not read (that would be the
    whole archive).

    A partition with a run in flight is not restated: that run records its work in OpsDB
    before its materialization is stored, and a restatement then would launch a report for
    nothing or, worse, land on top of the run's own materialization. It waits (still_waiting)
    until that run has ended, and is restated only if that run left it unmaterialized (a
    failed run). The runs in flight are looked at only when something is missing, and what was
    materialized meanwhile (a run that ended between the looks) is looked at again after."""
    instance = context.instance
    live = set(instance.get_dynamic_partitions(PACKAGES))
    observatory = config.settings.observatory
    sites = {site.short_name for site in config.settings.archive_sites}

    def ours(package: str, site: str, kind: LocationType) -> bool:
        return package in live and (site in sites or (
            site == observatory and kind == LocationType.BUFFER))

    with opsdb.session() as session:
        present = {copy_check_of(package, site, kind, site == observatory): (package, site, kind)
                   for package, site, kind in verified_placements(session)
                   if ours(package, site, kind)}
        purged = {key: place for key, place in (
            (copy_check_of(package, site, kind, site == observatory), (package, site, kind))
            for package, site, kind in purged_placements(session)
            if ours(package, site, kind) and kind == LocationType.BUFFER) if key not in present}
        # A copy made once and quarantined since, not yet made again (no verified copy
        # there): shown materialized with its check failed before the wipe, so again
        bad = {key: place for key, place in (
            (copy_check_of(package, site, kind, site == observatory), (package, site, kind))
            for package, site, kind in quarantined_placements(session)
            if ours(package, site, kind)) if key not in present and key not in purged}
        done = {*present, *purged, *bad,
                *((*BUILT, name) for name in built_packages(session) & live),
                *((*PURGED, name) for name in purged_packages(session) & live)}
    shown = {asset: instance.get_materialized_partitions(AssetKey(asset))
             for asset in {asset for asset, _, _ in done}}
    missing = sorted(key for key in done if key[2] not in shown[key[0]])
    if not missing:
        return [], False, []
    busy = in_flight(instance)
    waiting = [(asset, partition, events_before, True) for asset, _, partition in missing
               if partition_busy(asset, partition, busy)][:HELD_MAX]
    since = {asset: instance.get_materialized_partitions(AssetKey(asset),
                                                         after_cursor=events_before)
             for asset in {asset for asset, _, _ in missing}}
    free = [key for key in missing
            if not partition_busy(key[0], key[2], busy) and key[2] not in since[key[0]]]
    batch = free[:RESTATE_BATCH]
    with opsdb.session() as session:
        found = {(v.package, v.site, v.kind): v for v in verifications(
            session, [present[key] for key in batch if key in present],
            [purged[key] for key in batch if key in purged])}
        built = {b.package: b for b in builds(
            session, [name for asset, _, name in batch if asset == BUILT[0]])}
        cleared = {p.package: p for p in purges(
            session, [name for asset, _, name in batch if asset == PURGED[0]])}
        found_bad = {(q.package, q.site, q.kind): q for q in quarantines(
            session, [bad[key] for key in batch if key in bad])}
    told = []
    for asset, check, partition in batch:
        key = (asset, check, partition)
        place = present.get(key) or purged.get(key) or bad.get(key)
        if place is not None and place in found:
            told.append(_restated(asset, check, partition, found[place]))
        elif place is not None and place in found_bad:
            told.append(_restated_quarantine(asset, check, partition, found_bad[place]))
        elif asset == BUILT[0] and partition in built:
            told.append(_restated_build(built[partition]))
        elif asset == PURGED[0] and partition in cleared:
            told.append(_restated_purge(opsdb, config, cleared[partition]))
    return told, len(free) > RESTATE_BATCH, waiting


def _restated(asset: str, check: str, partition: str, copy: Verified) -> dict[str, Any]:
    by = (f" by {copy.verified_by} (operation {copy.operation_id})" if copy.operation_id
          else " (no read of it recorded)")
    again = ("the fixity scrub re-reads it" if copy.kind == LocationType.LONG_TERM_ARCHIVE
             else "Materialize on the partition re-reads it")
    if copy.deleted_at is not None:
        again = (f"deleted by the purge {copy.deleted_at:%Y-%m-%d %H:%M:%S} UTC; "
                 "nothing to re-read")
    return {"asset": asset, "check": check, "partition": partition, "passed": True,
            "description": f"restated from OpsDB: verified {copy.verified_at:%Y-%m-%d %H:%M:%S}"
                           f" UTC{by}; not re-read now, {again}",
            "materialize": {"restated_from": "OpsDB", "copy_id": str(copy.copy_id),
                            "verified_at": copy.verified_at.isoformat(),
                            "verified_by": copy.verified_by or "",
                            "operation_id": str(copy.operation_id or ""),
                            **({"deleted_at": copy.deleted_at.isoformat()}
                               if copy.deleted_at is not None else {})}}


def _restated_quarantine(asset: str, check: str, partition: str,
                         copy: Quarantined) -> dict[str, Any]:
    """A quarantined copy's partition as it was shown before its materializations were
    wiped: materialized (the copy was made once), its check failed with what the failed
    verification recorded, until a repair's new copy passes it."""
    when = f" {copy.found_at:%Y-%m-%d %H:%M:%S} UTC" if copy.found_at else ""
    return {"asset": asset, "check": check, "partition": partition, "passed": False,
            "description": f"restated from OpsDB: {copy.location}: copy {copy.copy_id} "
                           f"quarantined{when}: {copy.error or 'failed its verification'}; "
                           "not re-read now; red until a repair's new copy passes this check",
            "materialize": {"restated_from": "OpsDB", "copy_id": str(copy.copy_id),
                            "status": "quarantined",
                            "quarantined_at": copy.found_at.isoformat() if copy.found_at
                            else "",
                            "operation_id": str(copy.operation_id or "")}}


def _restated_build(built: Built) -> dict[str, Any]:
    asset, check = BUILT
    return {"asset": asset, "check": check, "partition": built.package, "passed": True,
            "description": f"restated from OpsDB: its {built.files} files ({built.bytes} bytes) "
                           f"were packaged {built.built_at:%Y-%m-%d %H:%M:%S} UTC; the sources "
                           "are not re-read now",
            "materialize": {"restated_from": "OpsDB", "files": str(built.files),
                            "bytes": str(built.bytes), "built_at": built.built_at.isoformat()}}


def _restated_purge(opsdb: OpsDB, config: Config, purged: Purged) -> dict[str, Any]:
    """The purge's materialization, and both its checks evaluated now, on OpsDB (as they are
    by a purge run: neither reads the storage)."""
    asset, check = PURGED
    problems = certificate_problems(opsdb, config, purged.package)
    with opsdb.session() as session:
        assessment = assess(session, config, get_package(session, purged.package))
    last = (f", the newest {purged.last_deleted_at:%Y-%m-%d %H:%M:%S} UTC"
            if purged.last_deleted_at else "")
    return {"asset": asset, "check": check, "partition": purged.package,
            "passed": not problems,
            "description": "\n".join(problems) or "every deletion certified",
            "materialize": {"restated_from": "OpsDB", "deleted": str(purged.deleted),
                            "deleted_bytes": str(purged.deleted_bytes),
                            "note": f"{purged.deleted} deletion(s) recorded in OpsDB{last}"},
            "also": [{"check": "filed_bytes_safe", "passed": assessment.health == Health.SAFE,
                      "description": assessment.reason,
                      "severity": (AssetCheckSeverity.ERROR if assessment.health == Health.LOST
                                   else AssetCheckSeverity.WARN).value}]}

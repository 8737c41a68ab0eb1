"""Keeps Dagster's live partitions bounded over years: a package archived long ago with
nothing left outside the long-term archives leaves the `packages` partitions. Its history
stays in OpsDB (`ccat-dt why`, `status`, `audit` still see it) and in Dagster's event log.
A partition naming no package or staging request OpsDB has (the UI's "Add partition" by
hand, an OpsDB restored from an older backup) leaves too, saying so: it stood in the UI as a
package never materialized, for ever, and each run of it fails once for its unknown name."""

from bisect import bisect_right
from datetime import timedelta

from dagster import DefaultSensorStatus, SensorEvaluationContext, SensorResult, sensor

from ccat_assets.inflight import in_flight
from ccat_assets.partitions import PACKAGES, package_partitions, staging_partitions
from ccat_dt.opsdb.models import StagingRequest, utcnow
from ccat_dt.pending import finished_packages, unknown_names
from ccat_dt.replicas import settle_states
from resources.deployment import Deployment
from sensors.stopped import held

# Live partitions examined per tick; the cursor (the last one examined) moves through them and
# wraps, so a backlog after an upgrade drains over a few ticks instead of one long one.
BATCH = 5000


@sensor(minimum_interval_seconds=3600, default_status=DefaultSensorStatus.RUNNING)
def retire_partitions_sensor(context: SensorEvaluationContext,
                             deployment: Deployment) -> SensorResult:
    settings = deployment.config.settings
    days = settings.policies.retire_partitions_after_days
    live = sorted(context.instance.get_dynamic_partitions(PACKAGES))
    start = bisect_right(live, context.cursor or "")
    batch = live[start:start + BATCH] or live[:BATCH]
    # a policy changed since: ARCHIVED now (not by a stopped sensor's test)
    with deployment.opsdb.session(undo=held(context, "retire_partitions_sensor")) as session:
        if settled := settle_states(session, deployment.config, batch):
            context.log.info(f"{len(settled)} package(s) ARCHIVED under the configuration "
                             f"as it is now (required_lta_copies "
                             f"{settings.required_lta_copies}): {', '.join(settled[:5])}")
    assert staging_partitions.name is not None
    with deployment.opsdb.session() as session:
        retiring = finished_packages(session, utcnow() - timedelta(days=days), batch,
                                     [site.short_name for site in settings.archive_sites])
        strays = unknown_names(session, batch)
        stray_requests = unknown_names(  # few: every one looked at
            session, context.instance.get_dynamic_partitions(staging_partitions.name),
            StagingRequest)
    if retiring or strays or stray_requests:  # a run in flight (its purge storing its
        # output, say) keeps its partition
        busy = {package for _, package, _ in in_flight(context.instance)}
        retiring, strays, stray_requests = ([name for name in names if name not in busy]
                                            for names in (retiring, strays, stray_requests))
    for what, names in (("package", strays), ("staging request", stray_requests)):
        if names:
            context.log.warning(
                f"{len(names)} partition(s) naming no {what} in OpsDB retired (added by hand "
                f"in the UI, or OpsDB restored from an older backup): {', '.join(names[:20])}")
    cursor = batch[-1] if batch else ""
    requests = ([package_partitions.build_delete_request(retiring + strays)]
                if retiring or strays else []) + (
        [staging_partitions.build_delete_request(stray_requests)] if stray_requests else [])
    if not requests:
        return SensorResult(cursor=cursor, skip_reason=(
            f"none of {len(batch)} live package partition(s) was archived over {days:g} days "
            "ago with nothing left outside the archives"))
    return SensorResult(cursor=cursor, dynamic_partitions_requests=requests)

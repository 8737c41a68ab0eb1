"""Keeps Dagster's live partitions bounded over years: a package archived long ago with
nothing left outside the long-term archives leaves the `packages` partitions. Its history
stays in OpsDB (`ccat-dt why`, `status`, `audit` still see it) and in Dagster's event log."""

from datetime import timedelta

from dagster import DefaultSensorStatus, SensorEvaluationContext, SensorResult, SkipReason, sensor

from ccat_assets.partitions import package_partitions
from ccat_dt.opsdb.models import utcnow
from ccat_dt.pending import finished_packages
from resources.opsdb import Deployment


@sensor(minimum_interval_seconds=3600, default_status=DefaultSensorStatus.RUNNING)
def retire_partitions_sensor(context: SensorEvaluationContext,
                             deployment: Deployment) -> SensorResult | SkipReason:
    days = deployment.config.settings.policies.retire_partitions_after_days
    with deployment.opsdb.session() as session:
        finished = finished_packages(session, utcnow() - timedelta(days=days))
    live = set(context.instance.get_dynamic_partitions(package_partitions.name or "packages"))
    retiring = [name for name in finished if name in live]
    if not retiring:
        return SkipReason(f"no package archived over {days:g} days ago is still a partition")
    return SensorResult(dynamic_partitions_requests=[
        package_partitions.build_delete_request(retiring)])

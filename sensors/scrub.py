"""The fixity scrub schedule: LTA copies are re-read every hour, that hour's share of the
daily byte budget, the longest unverified first."""

from dagster import (
    DefaultScheduleStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from ccat_assets.execution import on_queue
from ccat_assets.partitions import package_site_key
from ccat_assets.scrub import scrub_job
from ccat_dt.opsdb.models import utcnow
from ccat_dt.pending import scrub_due
from ccat_dt.queues import verification_queue
from resources.deployment import Deployment


@schedule(job=scrub_job, cron_schedule="0 * * * *", default_status=DefaultScheduleStatus.RUNNING)
def fixity_scrub(context: ScheduleEvaluationContext,
                 deployment: Deployment) -> list[RunRequest] | SkipReason:
    """One run per archive site, on that site's queue, since the copies are read there."""
    budget = deployment.config.settings.policies.scrub_bytes_per_day // 24
    if budget <= 0:
        return SkipReason("policies.scrub_bytes_per_day is 0: the scrub is off")
    with deployment.opsdb.session() as session:
        due = scrub_due(session, budget, utcnow())
    if not due:
        return SkipReason("no LTA copy to scrub")
    by_site: dict[str, list[str]] = {}
    for d in due:
        by_site.setdefault(d.site, []).append(str(package_site_key(d.package, d.site)))
    hour = f"{context.scheduled_execution_time:%Y%m%dT%H}"
    config = deployment.config
    return [RunRequest(run_key=f"scrub:{site}:{hour}", run_config=on_queue(
        config, verification_queue(config, site),
        {"ops": {"reread_lta_copies": {"config": {"partitions": keys}}}}))
        for site, keys in sorted(by_site.items())]

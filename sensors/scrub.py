"""The fixity scrub schedule: LTA copies are re-read every hour, that hour's share of the
daily byte budget, the longest unverified first."""

from dagster import (
    DefaultScheduleStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from ccat_assets.partitions import package_site_key
from ccat_assets.scrub import scrub_job
from ccat_dt.pending import scrub_due
from resources.opsdb import Deployment


@schedule(job=scrub_job, cron_schedule="0 * * * *", default_status=DefaultScheduleStatus.RUNNING)
def fixity_scrub(context: ScheduleEvaluationContext,
                 deployment: Deployment) -> RunRequest | SkipReason:
    budget = deployment.config.settings.policies.scrub_bytes_per_day // 24
    if budget <= 0:
        return SkipReason("policies.scrub_bytes_per_day is 0: the scrub is off")
    with deployment.opsdb.session() as session:
        due = scrub_due(session, budget)
    if not due:
        return SkipReason("no LTA copy to scrub")
    keys = [str(package_site_key(d.package, d.site)) for d in due]
    return RunRequest(run_key=f"scrub:{context.scheduled_execution_time:%Y%m%dT%H}",
                      run_config={"ops": {"reread_lta_copies": {"config": {"partitions": keys}}}})

"""What a `ccat-dt retry` command would do (it does not exist yet; see the suite's report):
re-execute, as new runs of the same jobs, the partitions OpsDB shows as stalled, then let the
sensors take it from there."""

from __future__ import annotations

from dagster import DagsterInstance

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_assets.partitions import package_site_key
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.retry import resume_deletions, stalled_work

RETRY_TAG = "ccat/retry"


def operator_retry(config: Config, instance: DagsterInstance, opsdb: OpsDB, *,
                   rebuild_failed: bool = False) -> list[tuple[str, str, str]]:
    """Finish abandoned deletions, re-run every stalled partition once, then drive the
    sensors until idle; returns what was re-run as (job, package, site)."""
    defs = build_definitions(config)
    resume_deletions(opsdb, config)
    retried = []
    for item in stalled_work(opsdb, config, rebuild_failed=rebuild_failed):
        key = package_site_key(item.package, item.site) if item.site else item.package
        defs.resolve_job_def(item.job).execute_in_process(
            instance=instance, partition_key=key, raise_on_error=False,
            tags={RETRY_TAG: item.reason[:200]})
        retried.append((item.job, item.package, item.site))
    drive(defs, instance)
    return retried

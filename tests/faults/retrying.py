"""The operator's retry, as `ccat-dt retry` runs it (ccat_assets/retry.py)."""

from __future__ import annotations

from dagster import DagsterInstance

from ccat_assets.retry import operator_retry as retry_now
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB


def operator_retry(config: Config, instance: DagsterInstance, opsdb: OpsDB, *,
                   rebuild_failed: bool = False) -> list[tuple[str, str, str]]:
    """Returns what was re-run as (job, package, site)."""
    retried, _ = retry_now(config, instance, opsdb, rebuild_failed=rebuild_failed)
    return [(item.stage, item.package, item.site) for item in retried]

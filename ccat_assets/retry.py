"""`ccat-dt retry`: what an operator does after fixing a cause (a disk freed, a link back, a
source file restored), or after a piece of work was escalated past the re-attempt horizon:
this finishes abandoned deletions, re-runs each stalled partition once as a new run (which
starts a new re-attempt episode; not one a run in flight, the daemon's say, already does),
then lets the sensors take it from there. Transient faults
never need it: the re-attempt sensor requests failed work again by itself."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection

from dagster import DagsterInstance, RunRequest

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import DriveReport, close_dead_runs, drive, drive_lock
from ccat_assets.inflight import in_flight
from ccat_assets.partitions import package_site_key, revived
from ccat_assets.stages import JOBS
from ccat_assets.tags import RETRY_TAG
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.retry import Stalled, resume_deletions, stalled_work
from ccat_dt.stages import Stage

__all__ = ["RETRY_TAG", "operator_retry"]


def operator_retry(config: Config, instance: DagsterInstance, opsdb: OpsDB, *,
                   packages: Collection[str] | None = None, rebuild_failed: bool = False,
                   log: Callable[[str], None] = lambda _: None
                   ) -> tuple[list[Stalled], DriveReport]:
    with drive_lock(instance, log):
        return _retry(config, instance, opsdb, packages=packages, rebuild_failed=rebuild_failed,
                      log=log)


def _retry(config: Config, instance: DagsterInstance, opsdb: OpsDB, *,
           packages: Collection[str] | None, rebuild_failed: bool,
           log: Callable[[str], None]) -> tuple[list[Stalled], DriveReport]:
    defs = build_definitions(config)
    for purge in resume_deletions(opsdb, config):
        log(f"abandoned deletions of {purge.package} finished: {purge.deleted} copies")
    close_dead_runs(instance, log)  # a killed drive's runs: their work is re-run below
    busy = in_flight(instance, checks=False)  # the daemon's, a backfill's: it does the work
    retried = []
    for item in stalled_work(opsdb, config, packages=packages, rebuild_failed=rebuild_failed):
        if (item.stage, item.package, item.site or None) in busy:
            log(f"not retrying {item.stage.label} {_key(item)}: a run of it is queued or "
                "running")
        else:
            retried.append(item)
    attempt = uuid.uuid4().hex[:8]  # a new run key per retry: none is ever skipped as seen
    requests = [RunRequest(partition_key=_key(item), job_name=JOBS[item.stage].name,
                           run_key=_run_key(item, attempt), tags={RETRY_TAG: item.reason[:200]})
                for item in retried]
    for add in revived(instance, requests):  # a package archived long ago: its partition back
        instance.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys))
    for item in retried:
        log(f"retrying {item.stage.label} {_key(item)}: {item.reason}")
    # Executed by a drive, as its sensors' runs are (in child processes, within the run
    # limits, so that the UI's Terminate stops one), before its sensors tick; before, each
    # was executed in this process, one after the other, and Terminate could not stop it.
    report = drive(defs, instance, log=log,
                   requests=[(request, "ccat-dt retry") for request in requests])
    return retried, report


def _run_key(item: Stalled, attempt: str) -> str:
    """As the sensors' (stage:package:site), so that its run line names what it retries."""
    stage = "package" if item.stage == Stage.PACKAGING else str(item.stage)
    return f"{stage}:{item.package}:{item.site or '*'}:retry-{attempt}"


def _key(item: Stalled) -> str:
    return str(package_site_key(item.package, item.site)) if item.site else item.package

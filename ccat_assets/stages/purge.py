"""Purge: source files and buffer copies deleted where the retention policy allows, each
deletion resting on a certificate of LTA copies looked at on their storage just before."""

import time

import dagster
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetDep,
    AssetExecutionContext,
    AssetsDefinition,
    AssetSelection,
    Failure,
    MaterializeResult,
    asset,
    asset_check,
    define_asset_job,
)

from ccat_assets.partitions import by_package, keep_partition, package_partitions
from ccat_assets.stages.common import GROUP, permanent, transient_retries
from ccat_dt.config import Config
from ccat_dt.loss import Health
from ccat_dt.reaper import certificate_problems, purge_package
from ccat_dt.recheck import assess_on_storage
from resources.deployment import Deployment

ASSETS = ("purge_status",)
job = define_asset_job("purge_job", AssetSelection.assets(*ASSETS))


class PurgeCycle(dagster.Config):
    """Set by the purge sensor from its cycle plan; empty when materialised by hand (then the
    package's own plan applies, with no early deletions)."""

    copy_ids: list[int] | None = None
    early_ids: list[int] = []


def assets(config: Config) -> list[AssetsDefinition]:
    @asset(partitions_def=package_partitions, group_name=GROUP, kinds={"opsdb"},
           deps=[AssetDep("lta_copies", partition_mapping=by_package)],
           **transient_retries(config))
    def purge_status(context: AssetExecutionContext, deployment: Deployment,
                     config: PurgeCycle) -> MaterializeResult:
        """Source files and buffer copies deleted where the retention policy allows, each
        deletion resting on a certificate of verified LTA copies."""
        started = time.monotonic()
        try:
            report = purge_package(deployment.opsdb, deployment.config, context.partition_key,
                                   run_id=context.run.run_id, copy_ids=config.copy_ids,
                                   early_ids=config.early_ids)
        except LookupError as exc:  # a partition OpsDB does not know: nothing to purge
            raise permanent(exc) from exc
        deployment.report("purge", context.partition_key, "*",
                          "failed" if report.failures else "ok", time.monotonic() - started,
                          bytes=report.deleted_bytes, deleted=report.deleted)
        if report.failures:
            # A transient failure (OpsDB locked or cut, the link down under a `rm` or a look
            # at an LTA copy) is retried in the run: each attempt looks at the storage afresh
            # and finishes the deletions the last one left (`claims.abandoned_deletion`). A
            # refusal (the file is not the recorded copy) is decided and recorded for a
            # person: the run fails once; its other deletions wait for the re-attempt.
            raise Failure("deletions failed:\n" + "\n".join(report.failures),
                          allow_retries=not report.refused)
        keep_partition(context)
        return MaterializeResult(metadata={
            "deleted": report.deleted, "deleted_bytes": report.deleted_bytes,
            "kept": "\n".join(f"{d.site}/{d.location} {d.path}: {d.reason}"
                              for d in report.kept) or "nothing"})

    return [purge_status]


def checks(config: Config) -> list[AssetChecksDefinition]:
    @asset_check(asset="purge_status", partitions_def=package_partitions)
    def deletion_certificates(context: AssetCheckExecutionContext,
                              deployment: Deployment) -> AssetCheckResult:
        """Every deleted copy rests on a certificate of verified LTA copies made before it."""
        problems = certificate_problems(deployment.opsdb, deployment.config,
                                        context.partition_key)
        return AssetCheckResult(passed=not problems,
                                description="\n".join(problems) or "every deletion certified")

    @asset_check(asset="purge_status", partitions_def=package_partitions)
    def filed_bytes_safe(context: AssetCheckExecutionContext,
                         deployment: Deployment) -> AssetCheckResult:
        """Every filed byte of the package is in a good copy: red (ERROR) when it is lost,
        a warning while the sources are gone and archive copies are missing; the archive
        copies relied on are looked at on their storage (run alone from the UI, too)."""
        assessment = assess_on_storage(deployment.opsdb, deployment.config,
                                       context.partition_key)
        return AssetCheckResult(
            passed=assessment.health == Health.SAFE, description=assessment.reason,
            severity=(AssetCheckSeverity.ERROR if assessment.health == Health.LOST
                      else AssetCheckSeverity.WARN),
            metadata={"health": assessment.health.value})

    return [deletion_certificates, filed_bytes_safe]

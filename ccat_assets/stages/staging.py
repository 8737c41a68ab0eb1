"""Staging: a request's packages unpacked at its processing location from the nearest
verified LTA copy, every file checked against the manifest."""

import time

from dagster import (
    AllPartitionMapping,
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetDep,
    AssetExecutionContext,
    AssetsDefinition,
    AssetSelection,
    MaterializeResult,
    asset,
    asset_check,
    define_asset_job,
)

from ccat_assets.interrupts import stops_when_interrupted
from ccat_assets.partitions import STAGING_JOB, keep_partition, staging_partitions
from ccat_assets.stages.common import permanent, transient_retries
from ccat_dt.config import Config
from ccat_dt.staging import StagingError, not_active, stage, staged_problems
from ccat_dt.transports.base import TransferError
from resources.deployment import Deployment

ASSETS = ("staged_copies",)
job = define_asset_job(STAGING_JOB, AssetSelection.assets(*ASSETS))


def assets(config: Config) -> list[AssetsDefinition]:
    @asset(partitions_def=staging_partitions, group_name="staging", kinds={"processing"},
           deps=[AssetDep("lta_copies", partition_mapping=AllPartitionMapping())],
           **transient_retries(config))
    def staged_copies(context: AssetExecutionContext, deployment: Deployment) -> MaterializeResult:
        """The request's packages unpacked at its processing location from the nearest
        verified LTA copy, every file checked against the manifest."""
        started = time.monotonic()
        try:
            with stops_when_interrupted(context.instance, context.run.run_id):
                staged = stage(deployment.opsdb, deployment.config, context.partition_key,
                               run_id=context.run.run_id)
        except StagingError as exc:
            # Its disk not mounted, say: a retry within the run, seconds later, does not help;
            # the re-attempt sensor's, after a back-off, does.
            raise permanent(exc) from exc
        except TransferError as exc:  # the tar's copy to a full processing disk, say
            if not exc.retryable:
                raise permanent(exc) from exc
            raise
        deployment.report("staging", context.partition_key, "*", "ok",
                          time.monotonic() - started, bytes=staged.bytes)
        keep_partition(context)
        return MaterializeResult(metadata={"packages": staged.packages, "files": staged.files,
                                           "bytes": staged.bytes,
                                           "outcome": staged.note or "staged"})

    return [staged_copies]


def checks(config: Config) -> list[AssetChecksDefinition]:
    @asset_check(asset="staged_copies", partitions_def=staging_partitions)
    def staged_files_verified(context: AssetCheckExecutionContext,
                              deployment: Deployment) -> AssetCheckResult:
        """Every staged file re-reads to the checksum filed at the observatory."""
        if ended := not_active(deployment.opsdb, context.partition_key):  # files not wanted
            return AssetCheckResult(passed=True, description=ended)  # any more: none expected
        problems = staged_problems(deployment.opsdb, context.partition_key)
        return AssetCheckResult(passed=not problems,
                                description="\n".join(problems) or "every staged file verified")

    return [staged_files_verified]

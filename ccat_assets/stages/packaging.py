"""Packaging: the raw files of a package become a tar + manifest at the observatory buffer."""

import time

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetExecutionContext,
    AssetsDefinition,
    AssetSelection,
    Failure,
    MaterializeResult,
    asset,
    asset_check,
    define_asset_job,
)

from ccat_assets.interrupts import stops_when_interrupted
from ccat_assets.partitions import keep_partition, package_partitions
from ccat_assets.stages.common import GROUP, permanent, transient_retries, verified
from ccat_dt import packages as package_builds
from ccat_dt.config import Config
from ccat_dt.opsdb.models import LocationType
from ccat_dt.packages import BufferFailed, PackageBuildFailed, fail_unbuilt, source_problems
from resources.deployment import Deployment

ASSETS = ("raw_files", "packages")
job = define_asset_job("package_job", AssetSelection.assets(*ASSETS))


def assets(config: Config) -> list[AssetsDefinition]:
    @asset(partitions_def=package_partitions, group_name=GROUP, kinds={"opsdb"})
    def raw_files(context: AssetExecutionContext, deployment: Deployment) -> MaterializeResult:
        """The package's raw files, as filed by the instruments at the observatory source."""
        try:
            filed = package_builds.filed_files(deployment.opsdb, context.partition_key)
        except LookupError as exc:  # a partition OpsDB does not know
            raise permanent(exc) from exc
        keep_partition(context)
        return MaterializeResult(metadata={"files": filed.count, "bytes": filed.bytes,
                                           "locations": ", ".join(filed.locations)})

    @asset(partitions_def=package_partitions, group_name=GROUP, kinds={"tar"},
           deps=[raw_files], **transient_retries(config))
    def packages(context: AssetExecutionContext, deployment: Deployment) -> MaterializeResult:
        """Tar + manifest of the raw files, built in one read pass at the observatory buffer
        (once: a package built before reports its verified copies instead)."""
        started, site = time.monotonic(), deployment.config.settings.observatory
        deployment.metrics.watch_progress()  # a long build is seen while it runs
        try:
            with stops_when_interrupted(context.instance, context.run.run_id):
                built = package_builds.ensure_built(deployment.opsdb, deployment.config,
                                                    context.partition_key,
                                                    run_id=context.run.run_id)
        except PackageBuildFailed as exc:
            deployment.report("packaging", context.partition_key, site, "failed",
                              time.monotonic() - started, error=str(exc))
            raise Failure(str(exc), allow_retries=False) from exc
        except (LookupError, FileExistsError) as exc:  # a file OpsDB does not know at the path
            raise permanent(exc) from exc
        except BufferFailed as exc:  # full, read-only, unmounted: no retry storm in the run
            if not exc.retryable:
                raise permanent(exc) from exc
            raise
        ref = built.ref
        deployment.report("packaging", context.partition_key, site,
                          "unchanged" if built.note else "ok", time.monotonic() - started,
                          bytes=ref.size)
        keep_partition(context)
        return MaterializeResult(metadata={
            "path": ref.path, "size": ref.size, "checksum": ref.checksum,
            "outcome": built.note or "built now",
            "verified_copies": "\n".join(built.verified) or "none"})

    return [raw_files, packages]


def checks(config: Config) -> list[AssetChecksDefinition]:
    observatory = config.settings.observatory

    @asset_check(asset="raw_files", partitions_def=package_partitions, blocking=True)
    def raw_files_present(context: AssetCheckExecutionContext,
                          deployment: Deployment) -> AssetCheckResult:
        """Every raw file of the package is at the source with its filed size (a source disk
        not mounted fails the check, and the run, for now: its re-attempt looks again)."""
        found = source_problems(deployment.opsdb, context.partition_key)
        fail_unbuilt(deployment.opsdb, deployment.config, context.partition_key,
                     found)  # `why` shows it
        keep_partition(context)  # the packages step next reads it
        return AssetCheckResult(passed=found.passed,
                                description=found.summary())

    @asset_check(asset="packages", partitions_def=package_partitions, blocking=True)
    def package_checksum(context: AssetCheckExecutionContext,
                         deployment: Deployment) -> AssetCheckResult:
        """The tar at the observatory buffer reads to the recorded package checksum: read back
        by its build in this run, else re-read now."""
        return verified(context, deployment, context.partition_key, observatory,
                        LocationType.BUFFER)

    return [raw_files_present, package_checksum]

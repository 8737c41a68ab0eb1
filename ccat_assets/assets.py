"""The package lifecycle as software-defined assets; each body is one sentence of the pipeline."""


import time

import dagster
from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    AssetsDefinition,
    Backoff,
    Failure,
    RetryPolicy,
    asset,
)

from ccat_assets.partitions import (
    by_package,
    package_partitions,
    package_site_partitions,
    split_key,
    staging_partitions,
)
from ccat_dt import packages as packaging_stage
from ccat_dt.config import Config
from ccat_dt.opsdb.models import LocationType
from ccat_dt.packages import FiledFiles, PackageBuildFailed
from ccat_dt.reaper import PurgeReport, purge_package
from ccat_dt.references import CopyRef, Placement
from ccat_dt.replicas import NotReady, plan_placement
from ccat_dt.staging import Staged, stage
from resources.opsdb import Deployment

GROUP = "lifecycle"


class PurgeCycle(dagster.Config):
    """Set by the purge sensor from its cycle plan; empty when materialised by hand (then the
    package's own plan applies, with no early deletions)."""

    copy_ids: list[int] | None = None
    early_ids: list[int] = []


def transient_retries(config: Config) -> RetryPolicy:
    return RetryPolicy(max_retries=config.settings.policies.max_attempts - 1, delay=2,
                       backoff=Backoff.EXPONENTIAL)


def permanent(exc: BaseException) -> Failure:
    """A failure no retry can fix (a missing source copy, an unknown package): fails the step
    once, with the cause as its headline (not "Exceeded max_retries")."""
    return Failure(description=str(exc), allow_retries=False)


def _planned(deployment: Deployment, package: str, site: str,
             kind: LocationType) -> Placement:
    try:
        return plan_placement(deployment.opsdb, deployment.config, package, site, kind)
    except (NotReady, LookupError) as exc:
        raise permanent(exc) from exc


def build_assets(config: Config) -> list[AssetsDefinition]:
    per_site = package_site_partitions(config)
    retries = transient_retries(config)

    @asset(partitions_def=package_partitions, group_name=GROUP, kinds={"opsdb"})
    def raw_files(context: AssetExecutionContext, deployment: Deployment) -> FiledFiles:
        """The package's raw files, as filed by the instruments at the observatory source."""
        filed = packaging_stage.filed_files(deployment.opsdb, context.partition_key)
        context.add_output_metadata({"files": filed.count, "bytes": filed.bytes,
                                     "locations": ", ".join(filed.locations)})
        return filed

    @asset(partitions_def=package_partitions, group_name=GROUP, kinds={"tar"},
           deps=[raw_files], retry_policy=retries)
    def packages(context: AssetExecutionContext, deployment: Deployment) -> CopyRef:
        """Tar + manifest of the raw files, built in one read pass at the observatory buffer
        (once: a package built before reports its verified copies instead)."""
        started, site = time.monotonic(), deployment.config.settings.observatory
        deployment.metrics.watch_progress()  # a long build is seen while it runs
        try:
            built = packaging_stage.ensure_built(deployment.opsdb, deployment.config,
                                                 context.partition_key,
                                                 run_id=context.run.run_id)
        except PackageBuildFailed as exc:
            deployment.report("packaging", context.partition_key, site, "failed",
                              time.monotonic() - started, error=str(exc))
            raise Failure(str(exc), allow_retries=False) from exc
        except LookupError as exc:
            raise permanent(exc) from exc
        ref = built.ref
        deployment.report("packaging", context.partition_key, site,
                          "unchanged" if built.note else "ok", time.monotonic() - started,
                          bytes=ref.size)
        context.add_output_metadata({
            "path": ref.path, "size": ref.size, "checksum": ref.checksum,
            "outcome": built.note or "built now",
            "verified_copies": "\n".join(built.verified) or "none"})
        return ref

    @asset(partitions_def=per_site, group_name=GROUP, kinds={"transfer"},
           deps=[AssetDep(packages, partition_mapping=by_package)],
           io_manager_key="site_copy_io_manager", retry_policy=retries)
    def site_copies(context: AssetExecutionContext, deployment: Deployment) -> Placement:
        """The package in the site's buffer: out of the observatory once, then archive to
        archive; the IO manager moves and verifies it."""
        package, site = split_key(context.partition_key)
        return _planned(deployment, package, site, LocationType.BUFFER)

    @asset(partitions_def=per_site, group_name=GROUP, kinds={"archive"},
           deps=[site_copies], io_manager_key="lta_io_manager", retry_policy=retries)
    def lta_copies(context: AssetExecutionContext, deployment: Deployment) -> Placement:
        """The package archived in the site's long-term archive, from its buffer copy (or,
        that purged or bad, from the nearest verified LTA copy elsewhere)."""
        package, site = split_key(context.partition_key)
        return _planned(deployment, package, site, LocationType.LONG_TERM_ARCHIVE)

    @asset(partitions_def=package_partitions, group_name=GROUP, kinds={"opsdb"},
           deps=[AssetDep(lta_copies, partition_mapping=by_package)])
    def purge_status(context: AssetExecutionContext, deployment: Deployment,
                     config: PurgeCycle) -> PurgeReport:
        """Source files and buffer copies deleted where the retention policy allows, each
        deletion resting on a certificate of verified LTA copies."""
        started = time.monotonic()
        report = purge_package(deployment.opsdb, deployment.config, context.partition_key,
                               run_id=context.run.run_id, copy_ids=config.copy_ids,
                               early_ids=config.early_ids)
        deployment.report("purge", context.partition_key, "*",
                          "failed" if report.failures else "ok", time.monotonic() - started,
                          bytes=report.deleted_bytes, deleted=report.deleted)
        context.add_output_metadata({
            "deleted": report.deleted, "deleted_bytes": report.deleted_bytes,
            "kept": "\n".join(f"{d.site}/{d.location} {d.path}: {d.reason}"
                              for d in report.kept) or "nothing"})
        if report.failures:
            raise Failure("deletions failed:\n" + "\n".join(report.failures))
        return report

    @asset(partitions_def=staging_partitions, group_name="staging", kinds={"processing"},
           deps=[AssetDep(lta_copies, partition_mapping=AllPartitionMapping())],
           retry_policy=retries)
    def staged_copies(context: AssetExecutionContext, deployment: Deployment) -> Staged:
        """The request's packages unpacked at its processing location from the nearest
        verified LTA copy, every file checked against the manifest."""
        started = time.monotonic()
        staged = stage(deployment.opsdb, deployment.config, context.partition_key,
                       run_id=context.run.run_id)
        deployment.report("staging", context.partition_key, "*", "ok",
                          time.monotonic() - started, bytes=staged.bytes)
        context.add_output_metadata({"packages": staged.packages, "files": staged.files,
                                     "bytes": staged.bytes})
        return staged

    return [raw_files, packages, site_copies, lta_copies, purge_status, staged_copies]

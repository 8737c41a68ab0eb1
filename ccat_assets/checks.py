"""Integrity reports per partition; a failed check marks the copy CORRUPT in OpsDB, which the
purge planner honours, so purge is gated on checks across runs, not just within one."""


from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetsDefinition,
    asset_check,
)

from ccat_assets.partitions import (
    package_partitions,
    package_site_partitions,
    split_key,
    staging_partitions,
)
from ccat_dt.config import Config
from ccat_dt.loss import Health, assess
from ccat_dt.opsdb.models import LocationType
from ccat_dt.packages import fail_unbuilt, get_package, source_problems
from ccat_dt.reaper import certificate_problems
from ccat_dt.replicas import check_stage
from ccat_dt.staging import staged_problems
from resources.opsdb import Deployment


def _reread(deployment: Deployment, package: str, site: str,
            kind: LocationType) -> AssetCheckResult:
    verification = check_stage(deployment.opsdb, deployment.config, package, site, kind)
    return AssetCheckResult(passed=verification.passed, description=verification.description,
                            metadata={"path": verification.path or "",
                                      "copy_id": verification.copy_id or 0})


def build_checks(config: Config,
                 assets: dict[str, AssetsDefinition]) -> list[AssetChecksDefinition]:
    per_site = package_site_partitions(config)
    observatory = config.settings.observatory

    @asset_check(asset=assets["raw_files"], partitions_def=package_partitions, blocking=True)
    def raw_files_present(context: AssetCheckExecutionContext,
                          deployment: Deployment) -> AssetCheckResult:
        """Every raw file of the package is at the source with its filed size."""
        problems = source_problems(deployment.opsdb, context.partition_key)
        fail_unbuilt(deployment.opsdb, context.partition_key, problems)  # `why` shows it
        return AssetCheckResult(passed=not problems,
                                description="\n".join(problems) or "all present")

    @asset_check(asset=assets["packages"], partitions_def=package_partitions, blocking=True)
    def package_checksum(context: AssetCheckExecutionContext,
                         deployment: Deployment) -> AssetCheckResult:
        """The tar at the observatory buffer re-reads to the recorded package checksum."""
        return _reread(deployment, context.partition_key, observatory, LocationType.BUFFER)

    @asset_check(asset=assets["site_copies"], partitions_def=per_site, blocking=True)
    def site_copy_checksum(context: AssetCheckExecutionContext,
                           deployment: Deployment) -> AssetCheckResult:
        """The copy in the site's buffer re-reads to the package checksum."""
        package, site = split_key(context.partition_key)
        return _reread(deployment, package, site, LocationType.BUFFER)

    @asset_check(asset=assets["lta_copies"], partitions_def=per_site, blocking=True)
    def lta_copy_checksum(context: AssetCheckExecutionContext,
                          deployment: Deployment) -> AssetCheckResult:
        """The copy in the site's long-term archive re-reads to the package checksum."""
        package, site = split_key(context.partition_key)
        return _reread(deployment, package, site, LocationType.LONG_TERM_ARCHIVE)

    @asset_check(asset=assets["purge_status"], partitions_def=package_partitions)
    def deletion_certificates(context: AssetCheckExecutionContext,
                              deployment: Deployment) -> AssetCheckResult:
        """Every deleted copy rests on a certificate of verified LTA copies made before it."""
        problems = certificate_problems(deployment.opsdb, deployment.config,
                                        context.partition_key)
        return AssetCheckResult(passed=not problems,
                                description="\n".join(problems) or "every deletion certified")

    @asset_check(asset=assets["purge_status"], partitions_def=package_partitions)
    def filed_bytes_safe(context: AssetCheckExecutionContext,
                         deployment: Deployment) -> AssetCheckResult:
        """Every filed byte of the package is in a good copy: red (ERROR) when it is lost,
        a warning while the sources are gone and archive copies are missing."""
        with deployment.opsdb.session() as session:
            package = get_package(session, context.partition_key)
            assessment = assess(session, deployment.config, package)
        return AssetCheckResult(
            passed=assessment.health == Health.SAFE, description=assessment.reason,
            severity=(AssetCheckSeverity.ERROR if assessment.health == Health.LOST
                      else AssetCheckSeverity.WARN),
            metadata={"health": assessment.health.value})

    @asset_check(asset=assets["staged_copies"], partitions_def=staging_partitions)
    def staged_files_verified(context: AssetCheckExecutionContext,
                              deployment: Deployment) -> AssetCheckResult:
        """Every staged file re-reads to the checksum filed at the observatory."""
        problems = staged_problems(deployment.opsdb, context.partition_key)
        return AssetCheckResult(passed=not problems,
                                description="\n".join(problems) or "every staged file verified")

    return [raw_files_present, package_checksum, site_copy_checksum, lta_copy_checksum,
            deletion_certificates, filed_bytes_safe, staged_files_verified]

"""Site copies: the package in an archive site's buffer, out of the observatory once, then
archive to archive; the site copy IO manager (resources/placement.py) moves and verifies it."""

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetDep,
    AssetExecutionContext,
    AssetsDefinition,
    AssetSelection,
    asset,
    asset_check,
    define_asset_job,
)

from ccat_assets.partitions import by_package, package_site_partitions, split_key
from ccat_assets.stages.common import GROUP, planned, transient_retries, verified
from ccat_dt.config import Config
from ccat_dt.opsdb.models import LocationType
from ccat_dt.references import Placement
from resources.deployment import Deployment

ASSETS = ("site_copies",)
job = define_asset_job("site_copy_job", AssetSelection.assets(*ASSETS))
# The copy and its archiving into the same site's LTA in one run (Dagster orders the steps:
# lta_copies after site_copies and its blocking check); see stages.copy_job for where it is used.
with_archive = define_asset_job("site_copy_archive_job",
                                AssetSelection.assets(*ASSETS, "lta_copies"))


def assets(config: Config) -> list[AssetsDefinition]:
    @asset(partitions_def=package_site_partitions(config), group_name=GROUP,
           kinds={"transfer"}, deps=[AssetDep("packages", partition_mapping=by_package)],
           io_manager_key="site_copy_io_manager", **transient_retries(config))
    def site_copies(context: AssetExecutionContext, deployment: Deployment) -> Placement:
        """The package in the site's buffer: out of the observatory once, then archive to
        archive; the IO manager moves and verifies it."""
        return planned(context, deployment, LocationType.BUFFER)

    return [site_copies]


def checks(config: Config) -> list[AssetChecksDefinition]:
    @asset_check(asset="site_copies", partitions_def=package_site_partitions(config),
                 blocking=True)
    def site_copy_checksum(context: AssetCheckExecutionContext,
                           deployment: Deployment) -> AssetCheckResult:
        """The copy in the site's buffer read on its storage to the package checksum:
        by the transport on the landed bytes when this run placed it, else re-read now."""
        package, site = split_key(context.partition_key)
        return verified(context, deployment, package, site, LocationType.BUFFER)

    return [site_copy_checksum]

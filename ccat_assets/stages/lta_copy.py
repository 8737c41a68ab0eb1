"""LTA copies: the package archived in an archive site's long-term archive, from its buffer
copy (or, that purged or bad, from the nearest verified LTA copy elsewhere); the LTA IO
manager (resources/placement.py) moves and verifies it."""

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

from ccat_assets.partitions import package_site_partitions, split_key
from ccat_assets.stages.common import GROUP, planned, transient_retries, verified
from ccat_dt.config import Config
from ccat_dt.opsdb.models import LocationType
from ccat_dt.references import Placement
from resources.deployment import Deployment

ASSETS = ("lta_copies",)
job = define_asset_job("lta_copy_job", AssetSelection.assets(*ASSETS))


def assets(config: Config) -> list[AssetsDefinition]:
    @asset(partitions_def=package_site_partitions(config), group_name=GROUP, kinds={"archive"},
           deps=[AssetDep("site_copies")], io_manager_key="lta_io_manager",
           **transient_retries(config))
    def lta_copies(context: AssetExecutionContext, deployment: Deployment) -> Placement:
        """The package archived in the site's long-term archive, from its buffer copy (or,
        that purged or bad, from the nearest verified LTA copy elsewhere)."""
        return planned(context, deployment, LocationType.LONG_TERM_ARCHIVE)

    return [lta_copies]


def checks(config: Config) -> list[AssetChecksDefinition]:
    @asset_check(asset="lta_copies", partitions_def=package_site_partitions(config),
                 blocking=True)
    def lta_copy_checksum(context: AssetCheckExecutionContext,
                          deployment: Deployment) -> AssetCheckResult:
        """The copy in the site's long-term archive read on its storage to the package checksum:
        by the transport on the landed bytes when this run placed it, else re-read now."""
        package, site = split_key(context.partition_key)
        return verified(context, deployment, package, site, LocationType.LONG_TERM_ARCHIVE)

    return [lta_copy_checksum]

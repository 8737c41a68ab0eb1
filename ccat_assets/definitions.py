"""The one Definitions object: assets, checks, jobs, sensors and resources, from one config."""

from __future__ import annotations

from dagster import (
    AssetSelection,
    Definitions,
    FilesystemIOManager,
    define_asset_job,
    definitions,
)
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,
)

from ccat_assets.assets import build_assets
from ccat_assets.checks import build_checks
from ccat_dt.config import Config, load_config
from ccat_dt.opsdb.models import LocationType
from resources.opsdb import Deployment
from resources.placement import PlacementIOManager
from sensors.lifecycle import lifecycle_sensors


def build_definitions(config: Config) -> Definitions:
    assets = build_assets(config)
    by_name = {a.key.to_user_string(): a for a in assets}
    deployment = Deployment(config_path=str(config.path))

    def job(name: str, *asset_names: str) -> UnresolvedAssetJobDefinition:
        return define_asset_job(name, selection=AssetSelection.assets(*asset_names))

    return Definitions(
        assets=assets,
        asset_checks=build_checks(config, by_name),
        jobs=[job("package_job", "raw_files", "packages"), job("site_copy_job", "site_copies"),
              job("lta_copy_job", "lta_copies"), job("purge_job", "purge_status"),
              job("staging_job", "staged_copies")],
        sensors=lifecycle_sensors(),
        resources={
            "deployment": deployment,
            "site_copy_io_manager": PlacementIOManager(
                deployment=deployment, location_type=LocationType.BUFFER.value),
            "lta_io_manager": PlacementIOManager(
                deployment=deployment, location_type=LocationType.LONG_TERM_ARCHIVE.value),
            "io_manager": FilesystemIOManager(),
        },
    )


@definitions
def defs() -> Definitions:
    """Loaded by `dagster dev` / the daemon from $CCAT_DT_CONFIG (see workspace.yaml)."""
    return build_definitions(load_config())

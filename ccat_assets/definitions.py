"""The one Definitions object: assets, checks, jobs, sensors and resources, from one config."""

from __future__ import annotations

from dagster import Definitions, definitions

from ccat_assets.execution import executor
from ccat_assets.integrity import integrity_report_job
from ccat_assets.runlog import console
from ccat_assets.scrub import scrub_job
from ccat_assets.stages import ALL_JOBS, build_assets, build_checks
from ccat_dt.config import Config, load_config
from ccat_dt.jsonlog import configure_from_env
from ccat_dt.opsdb.models import LocationType
from resources.deployment import Deployment
from resources.placement import PlacementIOManager
from sensors.integrity import integrity_sensor
from sensors.lifecycle import lifecycle_sensors
from sensors.notify import notification_sensor
from sensors.observability import service_level_sensor
from sensors.overview import OVERVIEW, overview_sensor
from sensors.retire import retire_partitions_sensor
from sensors.scrub import fixity_scrub


def build_definitions(config: Config) -> Definitions:
    assets = build_assets(config)
    deployment = Deployment(config_path=str(config.path))

    return Definitions(
        assets=[*assets, OVERVIEW],
        asset_checks=build_checks(config),
        jobs=[*ALL_JOBS, scrub_job, integrity_report_job],
        sensors=[*lifecycle_sensors(), service_level_sensor, retire_partitions_sensor,
                 notification_sensor, integrity_sensor, overview_sensor],
        executor=executor(config),
        schedules=[fixity_scrub],
        loggers={"console": console},  # Dagster's, quiet under the CLI (ccat_assets/runlog.py)
        resources={
            "deployment": deployment,
            "site_copy_io_manager": PlacementIOManager(
                deployment=deployment, location_type=LocationType.BUFFER.value),
            "lta_io_manager": PlacementIOManager(
                deployment=deployment, location_type=LocationType.LONG_TERM_ARCHIVE.value),
        },
    )


@definitions
def defs() -> Definitions:
    """Loaded by `dagster dev` / the daemon from $CCAT_DT_CONFIG (see workspace.yaml)."""
    configure_from_env()  # JSON-lines operation logs when $CCAT_DT_LOG_JSON is set
    return build_definitions(load_config())

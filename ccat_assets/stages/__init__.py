"""One module per stage of a package's journey, each holding its assets, its checks and its
job. Here they come together for the one Definitions, and each domain stage
(ccat_dt.stages.Stage) finds its job and assets."""

from __future__ import annotations

from types import ModuleType

from dagster import AssetChecksDefinition, AssetsDefinition
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,
)

from ccat_assets.stages import lta_copy, packaging, purge, site_copy, staging
from ccat_dt.config import Config
from ccat_dt.stages import Stage

MODULES: dict[Stage, ModuleType] = {
    Stage.PACKAGING: packaging, Stage.SITE_COPY: site_copy, Stage.LTA_COPY: lta_copy,
    Stage.PURGE: purge, Stage.STAGING: staging}
JOBS: dict[Stage, UnresolvedAssetJobDefinition] = {
    stage: module.job for stage, module in MODULES.items()}
# Every asset name, in lifecycle order, with its stage.
ASSET_STAGE: dict[str, Stage] = {
    name: stage for stage, module in MODULES.items() for name in module.ASSETS}


def stage_of_job(name: str | None) -> Stage | None:
    return next((stage for stage, job in JOBS.items() if job.name == name), None)


def build_assets(config: Config) -> list[AssetsDefinition]:
    return [a for module in MODULES.values() for a in module.assets(config)]


def build_checks(config: Config) -> list[AssetChecksDefinition]:
    return [c for module in MODULES.values() for c in module.checks(config)]

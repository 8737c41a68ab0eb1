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
# Jobs that run several stages in one run, with those stages in order: the first one names
# the run (its link, its queue, its re-attempts).
COMBINED: dict[str, tuple[Stage, ...]] = {
    site_copy.with_archive.name: (Stage.SITE_COPY, Stage.LTA_COPY)}
ALL_JOBS: list[UnresolvedAssetJobDefinition] = [*JOBS.values(), site_copy.with_archive]
# Every asset name, in lifecycle order, with its stage.
ASSET_STAGE: dict[str, Stage] = {
    name: stage for stage, module in MODULES.items() for name in module.ASSETS}


def stages_of_job(name: str | None) -> tuple[Stage, ...]:
    if name in COMBINED:
        return COMBINED[name]
    return tuple(stage for stage, job in JOBS.items() if job.name == name)


def stage_of_job(name: str | None) -> Stage | None:
    stages = stages_of_job(name)
    return stages[0] if stages else None


def jobs_of(stage: Stage) -> list[str]:
    """The names of the jobs whose runs do `stage`'s work."""
    return [job.name for job in ALL_JOBS if stage in stages_of_job(job.name)]


def copy_job(config: Config) -> UnresolvedAssetJobDefinition:
    """The job of a site copy the sensors request: with its archiving into that site's LTA in
    the same run in the embedded default (in-process: one run instead of two); under Celery a
    run per stage, each on its own site queue (transfer, archive), as the executor sends all of
    a run's steps to one queue."""
    return site_copy.with_archive if config.celery_broker is None else JOBS[Stage.SITE_COPY]


def build_assets(config: Config) -> list[AssetsDefinition]:
    return [a for module in MODULES.values() for a in module.assets(config)]


def build_checks(config: Config) -> list[AssetChecksDefinition]:
    return [c for module in MODULES.values() for c in module.checks(config)]

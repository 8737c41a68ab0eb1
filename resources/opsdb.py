"""The deployment (configuration file, the OpsDB it names, metrics and operation logs) as a
Dagster resource."""

import logging
from functools import cached_property
from typing import Any

from dagster import ConfigurableResource, InitResourceContext

from ccat_dt.config import Config, load_config
from ccat_dt.jsonlog import log_operation
from ccat_dt.metrics import Metrics, MetricsSettings
from ccat_dt.opsdb.database import OpsDB

OPERATIONS = logging.getLogger("ccat_dt.operations")


class Deployment(ConfigurableResource):  # type: ignore[misc]
    """Everything a step needs to find data: sites, locations, policies and OpsDB."""

    config_path: str

    @cached_property
    def config(self) -> Config:
        return load_config(self.config_path)

    @cached_property
    def opsdb(self) -> OpsDB:
        return OpsDB(self.config.opsdb_url)

    @cached_property
    def metrics(self) -> Metrics:
        url = self.config.metrics_url
        if url is None:
            return Metrics.disabled()
        settings = self.config.settings.metrics
        return Metrics(MetricsSettings(url=url, org=settings.org, bucket=settings.bucket,
                                       token_env=settings.token_env))

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        metrics = self.__dict__.pop("metrics", None)  # flush what is batched; a later
        if metrics is not None:                        # execution gets a fresh writer
            metrics.close()

    def report(self, stage: str, package: str, site: str, outcome: str, seconds: float,
               **fields: Any) -> None:
        """One finished operation: a JSON log record and a stage metric (neither can fail
        or slow the step: metrics are batched and dropped when the server is down)."""
        log_operation(OPERATIONS, stage=stage, package=package, site=site, outcome=outcome,
                      seconds=round(seconds, 3), **fields)
        self.metrics.stage(stage, outcome, seconds, package)

"""The deployment (configuration file, the OpsDB it names, metrics and operation logs) as a
Dagster resource."""

import logging
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource, Failure, InitResourceContext

from ccat_assets.instance import instance_home
from ccat_dt.config import Config, load_config
from ccat_dt.jsonlog import log_operation
from ccat_dt.metrics import Metrics, MetricsSettings
from ccat_dt.opsdb.database import OpsDB, check_schema
from ccat_dt.ownership import WrongUser, refuse_root_on_foreign, written_first
from ccat_dt.topology import check_topology

OPERATIONS = logging.getLogger("ccat_dt.operations")


# A Dagster run builds its resources afresh; a process runs many (the in-process driver, the
# daemon's sensor ticks). Parsing the YAML and opening OpsDB (engine + schema check) for each
# was ~12% of the orchestration overhead (docs/benchmarks.md, section 5), so both are kept: the
# config per file content, the OpsDB per URL. A drive's forked runs inherit the driver's OpsDB
# with the statements its sensor ticks compiled, but never its connections: each child opens
# its own (opsdb/database.py, at fork).
@lru_cache(maxsize=8)
def _parsed_config(path: str, content: bytes) -> Config:
    return load_config(path)


@lru_cache(maxsize=8)
def _opened_opsdb(url: str) -> OpsDB:
    return OpsDB(url)


class Deployment(ConfigurableResource):  # type: ignore[misc]
    """Everything a step needs to find data: sites, locations, policies and OpsDB."""

    config_path: str

    @cached_property
    def config(self) -> Config:
        path = Path(self.config_path).expanduser().absolute()
        try:
            content = path.read_bytes()
        except OSError:
            return load_config(path)  # which says what is wrong with the path
        return _parsed_config(str(path), content)

    @cached_property
    def opsdb(self) -> OpsDB:
        """Refused (TopologyDrift, with what to do) while the configuration and OpsDB
        disagree on the locations: every sensor tick and run says so, and none acts. The
        OpsDB is opened once per process, so its schema is looked at again here: a process
        that outlived a `migrate` (a Celery worker, the daemon, a drive) is refused
        (SchemaOutOfDate) instead of writing with its old models into the new schema. A run
        or tick in a process running as root (a root `dagster dev` or `dagster asset
        materialize`) on a deployment another user owns is refused (WrongUser) before it
        writes there."""
        try:
            refuse_root_on_foreign(written_first(self.config, instance_home(self.config)), None)
        except WrongUser as exc:  # no retry changes who runs it
            raise Failure(description=str(exc), allow_retries=False) from exc
        opsdb = _opened_opsdb(self.config.opsdb_url)
        check_schema(opsdb.engine)
        check_topology(opsdb, self.config)
        return opsdb

    @cached_property
    def metrics(self) -> Metrics:
        url = self.config.metrics_url
        if url is None:
            return Metrics.disabled()
        settings = self.config.settings.metrics
        metrics = Metrics(MetricsSettings(url=url, org=settings.org, bucket=settings.bucket,
                                          token_env=settings.token_env))
        metrics.watch_progress()  # long transfers seen while they run; stops at close()
        return metrics

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

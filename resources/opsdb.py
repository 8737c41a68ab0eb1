"""The deployment (configuration file + the OpsDB it names) as a Dagster resource."""


from functools import cached_property

from dagster import ConfigurableResource

from ccat_dt.config import Config, load_config
from ccat_dt.opsdb.database import OpsDB


class Deployment(ConfigurableResource):  # type: ignore[misc]
    """Everything a step needs to find data: sites, locations, policies and OpsDB."""

    config_path: str

    @cached_property
    def config(self) -> Config:
        return load_config(self.config_path)

    @cached_property
    def opsdb(self) -> OpsDB:
        return OpsDB(self.config.opsdb_url)

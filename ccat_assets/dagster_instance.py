"""Dagster's instance, unchanged, named by dagster.yaml's `instance_class` (both templates) so
that SQLAlchemy's ORM is imported as the instance is built, whatever its storage: in the
process's main thread, before `dagster-webserver` serves.

Dagster builds the instance's run coordinator (ours, ccat_assets.routing, whose OpsDB models
import the ORM) only when it is first asked for, in `dagster-webserver` from one of its
GraphQL threads, while others run queries. SQLAlchemy registers the ORM's inspection of any
value before its `orm.exc` module is complete, so a query in another thread binding a value
at that moment (a run's stats: `group_by("dagster_event_type")`) failed on "partially
initialized module 'sqlalchemy.orm.exc' has no attribute 'UnmappedClassError'": the UI's
"Unexpected GraphQL error" on the first page an operator opened (tests/test_instance.py).
"""

from typing import Any

import sqlalchemy.orm  # noqa: F401  complete before any server thread: see above
from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef


class OrmReadyInstance(DagsterInstance):
    """DagsterInstance itself; Dagster asks an `instance_class` for these two."""

    @classmethod
    def config_schema(cls) -> dict[str, Any]:
        return {}  # no settings of its own

    config_defaults = staticmethod(InstanceRef.config_defaults)

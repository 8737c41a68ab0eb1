"""Live Dagster partitions stay bounded: finished packages are retired from the `packages`
partitions after the configured age, and OpsDB still answers for them."""

from __future__ import annotations

from pathlib import Path

from dagster import DagsterInstance

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.config import load_config
from ccat_dt.defaults import EMBEDDED_DEFAULT, write_default_config
from ccat_dt.diagnosis import diagnose
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import utcnow
from ccat_dt.topology import prepare_opsdb
from tests.test_lifecycle import instance, observe  # noqa: F401 - instance is a fixture


def test_finished_packages_leave_the_partitions_and_stay_in_opsdb(
        tmp_path: Path, instance: DagsterInstance) -> None:  # noqa: F811
    policies = {**EMBEDDED_DEFAULT["policies"], "retire_partitions_after_days": 0}  # type: ignore[dict-item]
    config = load_config(write_default_config(tmp_path / "deploy",
                                              overrides={"policies": policies}))
    prepare_opsdb(config)
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1, files=1)

    assert drive(build_definitions(config), instance).failed == []

    assert instance.get_dynamic_partitions("packages") == []
    with opsdb.session() as session:
        stages = diagnose(session, config, "obs-0_chai-lfa_p00", utcnow())
    assert [s.state for s in stages] == ["done"] * len(stages)
    assert drive(build_definitions(config), instance).launched == []

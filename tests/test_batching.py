"""Batching: packages waiting on the same hop travel in one transport session, each still
verified and recorded on its own partition."""

from __future__ import annotations

import copy
from pathlib import Path

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_assets.partitions import package_site_key
from ccat_dt.config import load_config
from ccat_dt.defaults import EMBEDDED_DEFAULT, write_default_config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    RawDataPackage,
)
from ccat_dt.topology import prepare_opsdb
from tests.helpers import observe


def test_one_session_moves_the_packages_of_an_observation(
        tmp_path: Path, instance: DagsterInstance) -> None:  # noqa: F811
    settings = copy.deepcopy(EMBEDDED_DEFAULT)
    settings["sites"] = [s for s in settings["sites"] if s["short_name"] != "us"]  # type: ignore[attr-defined,index]
    settings["routes"] = [  # type: ignore[index]
        {"origin": "ccat", "destination": "cologne", "transport": "local", "batch_bytes": 10**9},
        {"origin": "cologne", "destination": "ramses", "transport": "local"}]
    config = load_config(write_default_config(tmp_path / "deploy", overrides=settings))
    prepare_opsdb(config)
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1, files=2)  # two modules: two packages to cologne

    report = drive(build_definitions(config), instance)

    assert report.failed == []
    with opsdb.session() as session:
        transfers = session.scalars(select(Operation).where(
            Operation.operation_type == OperationType.TRANSFER)).all()
        assert len(transfers) == 2 and {t.status for t in transfers} == {OperationStatus.COMPLETED}
        assert len({t.run_id for t in transfers}) == 1  # one run, one session, both packages
        assert {t.package_id for t in transfers} == {1, 2}
        copies = session.scalars(select(PackageCopy).where(
            PackageCopy.id.in_([t.copy_id for t in transfers]))).all()
        assert all(c.verified_at is not None for c in copies)  # each verified on its own
        names = session.scalars(select(RawDataPackage.name)).all()
    assert len(names) == 2
    for name in names:
        # each partition materialised (by its own run, or by the run whose session moved it)
        assert instance.fetch_materializations(AssetRecordsFilter(
            asset_key=AssetKey("site_copies"),
            asset_partitions=[str(package_site_key(name, "cologne"))]), limit=1).records, name

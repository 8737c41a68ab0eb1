"""The OpsDB schema and the whole lifecycle on PostgreSQL: nothing in them is SQLite-only."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import inspect

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import write_default_config
from ccat_dt.opsdb.database import OpsDB, create_opsdb_engine, migrate
from ccat_dt.opsdb.models import Base
from ccat_dt.report import disagreements, summarize
from ccat_dt.topology import prepare_opsdb
from tests.helpers import observe


@pytest.fixture
def pg_config(tmp_path: Path, postgres_url: str) -> Config:
    config = load_config(write_default_config(tmp_path / "deploy",
                                              overrides={"opsdb_url": postgres_url}))
    prepare_opsdb(config)
    return config


def test_migrations_create_every_table_on_postgres(pg_config: Config) -> None:
    engine = create_opsdb_engine(pg_config.opsdb_url)
    assert engine.dialect.name == "postgresql"
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables
    migrate(pg_config.opsdb_url)  # a second upgrade is a no-op


def test_lifecycle_on_a_postgres_opsdb(pg_config: Config, tmp_path: Path) -> None:
    opsdb = OpsDB(pg_config.opsdb_url)
    observe(pg_config, opsdb, observations=1, files=2)
    home = tmp_path / "dagster_home"
    home.mkdir()
    with DagsterInstance.from_config(str(home)) as instance:
        report = drive(build_definitions(pg_config), instance)
    assert report.failed == []
    summary = summarize(opsdb)
    assert summary.packages == {"archived": 2}
    lines = {line.location: line for line in summary.locations}
    assert lines["ccat/instruments"].present == 0 and lines["ccat/instruments"].deleted == 4
    assert lines["cologne/lta"].present == 2 and lines["us/lta"].present == 2
    assert disagreements(opsdb) == []
    opsdb.dispose()

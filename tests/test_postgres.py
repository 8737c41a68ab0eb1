"""The OpsDB schema and the whole lifecycle on PostgreSQL: nothing in them is SQLite-only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from dagster import DagsterInstance
from sqlalchemy import Engine, inspect, make_url, select, text

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import write_default_config
from ccat_dt.filing import lock_observation, start_observation
from ccat_dt.opsdb.database import LINK_TIMEOUT_ENV, OpsDB, create_opsdb_engine, migrate
from ccat_dt.opsdb.models import Base, ExecutedObsUnit, ObservationStatus
from ccat_dt.report import disagreements, summarize
from ccat_dt.topology import prepare_opsdb
from tests.helpers import observe, run_cli


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


def _link(engine: Engine) -> tuple[dict[str, str], dict[str, str]]:
    """How a new connection of `engine` gives up a silent network path: libpq's parameters
    (the client's end) and the session's settings in the server (its end)."""
    with engine.connect() as connection:
        libpq: Any = connection.connection.dbapi_connection
        client = {key: value for key, value in libpq.get_dsn_parameters().items()
                  if key.startswith(("keepalives", "tcp_user_timeout", "connect_timeout"))}
        server = {name: setting for name, setting in connection.execute(text(
            "SELECT name, setting FROM pg_settings WHERE name IN ('tcp_keepalives_idle', "
            "'tcp_keepalives_interval', 'tcp_keepalives_count', 'tcp_user_timeout')"))}
    engine.dispose()
    return client, server


def test_both_ends_of_every_opsdb_session_give_a_silent_path_up(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The application's engine and Alembic's (`migrate`): libpq's keepalives and
    tcp_user_timeout (PG_LINK_TIMEOUT_S, 30 s), and the same asked of the server for its end
    of the session. Before, neither engine set any, and a query whose path black-holed waited
    for ever (tests/faults/test_opsdb_link_black_hole.py). A URL's own parameters are kept,
    and the server's end follows them; a setting the URL's `options` makes is left alone."""
    monkeypatch.delenv(LINK_TIMEOUT_ENV, raising=False)
    client = {"connect_timeout": "10", "keepalives": "1", "keepalives_idle": "10",
              "keepalives_interval": "5", "keepalives_count": "4", "tcp_user_timeout": "30000"}
    server = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5",
              "tcp_keepalives_count": "4", "tcp_user_timeout": "30000"}
    made: list[Engine] = []
    real = sqlalchemy.create_engine

    def recorded(*args: Any, **kwargs: Any) -> Engine:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(sqlalchemy, "create_engine", recorded)  # what migrations/env.py calls
    migrate(postgres_url)
    monkeypatch.setattr(sqlalchemy, "create_engine", real)
    [alembic] = made
    assert _link(alembic) == (client, server)
    assert _link(create_opsdb_engine(postgres_url)) == (client, server)

    url = make_url(postgres_url)
    own = url.update_query_dict({"keepalives_idle": "40", "tcp_user_timeout": "90000",
                                 "options": f"{url.query['options']} -ctcp_keepalives_count=7"})
    assert _link(create_opsdb_engine(own.render_as_string(hide_password=False))) == (
        {**client, "keepalives_idle": "40", "tcp_user_timeout": "90000"},
        {**server, "tcp_keepalives_idle": "40", "tcp_user_timeout": "90000",
         "tcp_keepalives_count": "7"})


def test_a_statement_the_server_cancels_is_told_as_such_and_changes_nothing(
        pg_config: Config, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`ccat-dt observation finish` whose statement the server cancels: a statement_timeout
    (here 0.3 s, on the command's connections) ran out while it waited for the observation's
    row, which another session holds. Exit 2 with a line saying so and what to do, nothing
    changed. Before, it said to "check that the database is running and reachable", which it
    was."""
    opsdb = OpsDB(pg_config.opsdb_url)
    start_observation(opsdb, "obs-1")
    url = make_url(pg_config.opsdb_url)  # its options name the test's schema
    url = url.update_query_dict({"options": f"{url.query['options']} -cstatement_timeout=300"})
    monkeypatch.setenv("CCAT_DT_OPSDB_URL", url.render_as_string(hide_password=False))
    with opsdb.session() as holder:  # an idle-in-transaction session on obs-1's row
        lock_observation(holder, ExecutedObsUnit.name == "obs-1")
        code = run_cli("--config", str(pg_config.path), "observation", "finish", "obs-1")
    said = capsys.readouterr().err
    assert code == 2, said
    assert "cancelled the statement" in said and "statement_timeout" in said, said
    assert "running and reachable" not in said, said
    with opsdb.session() as session:
        assert session.scalar(select(ExecutedObsUnit.status).where(
            ExecutedObsUnit.name == "obs-1")) == ObservationStatus.OPEN
    opsdb.dispose()

"""PostgreSQL refusing connections: a command says which database is out of reach."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ccat_dt.defaults import CONFIG_NAME
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import Operation
from tests.faults.pipeline import observe
from tests.helpers import run_cli
from tests.services import POSTGRES_URL


def _allow_connections(url: str, allowed: bool) -> None:
    """This test's own database (the dagster_database fixture's) accepts new connections or
    refuses them; the server and everyone else's databases are left alone."""
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'ALTER DATABASE "{make_url(url).database}" '
                                f'ALLOW_CONNECTIONS {"true" if allowed else "false"}'))
        if not allowed:
            connection.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"),
                {"name": make_url(url).database})
    admin.dispose()


def test_drive_with_dagster_storage_refused_names_the_instance_not_opsdb(
        tmp_path: Path, dagster_database: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Dagster's run storage on PostgreSQL refuses connections (restarting, its connection
    limit reached) while OpsDB (SQLite here) is fine: the one line `drive` ends with points at
    the instance's storage, not at opsdb_url, which a person would check in vain."""
    root = tmp_path / "deploy"
    assert run_cli("init", str(root)) == 0
    config_path = root / CONFIG_NAME
    home = root / "dagster_home"
    settings = yaml.safe_load((home / "dagster.yaml").read_text())
    for embedded in ("run_storage", "event_log_storage", "schedule_storage"):
        settings.pop(embedded, None)
    settings["storage"] = {"postgres": {"postgres_url": dagster_database}}
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config_path))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("CCAT_DT_OPSDB_URL", raising=False)
    from ccat_dt.config import load_config

    config = load_config(config_path)
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb)
    capsys.readouterr()

    _allow_connections(dagster_database, False)
    try:
        status = run_cli("drive")
    finally:
        _allow_connections(dagster_database, True)

    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2, line
    assert line.startswith("ccat-dt: error: ")
    assert "OpsDB" not in line, line  # OpsDB was reachable all along
    assert "opsdb_url" not in line, line
    assert "Dagster" in line and str(home / "dagster.yaml") in line, line
    with opsdb.session() as session:  # nothing was done: no run could be recorded
        assert session.query(Operation).count() == 0
    assert list(config.resolve_root("sites/ccat/buffer").rglob("*.tar")) == []
    opsdb.dispose()

"""Upgrades on a live deployment: the code and the OpsDB schema out of step. An OpsDB that a
newer ccat-dt migrated is refused by the older code's every command, `migrate` included, with
one line saying to upgrade the code (before: `migrate` failed with Alembic's "Can't locate
revision" as an internal error, exit 3, and the other commands said to run that `migrate`);
and a process that outlived an upgrade and `migrate` (a Celery worker, the daemon, a drive:
each opens the OpsDB once) is refused at its next run instead of writing with its old models
into the new schema (before: its cached OpsDB was never looked at again, and the head was read
from the migration files on disk, which the upgrade had replaced). And an archive site removed
from the configuration while its copy of a package was still in flight (its disk not there):
the package, in every archive the configuration now has, is ARCHIVED (before: TRANSFERRING for
ever, its state derived only when a copy changes: `status` said transferring and its Dagster
partition was never retired)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from alembic import command
from dagster import DagsterInstance
from sqlalchemy import create_engine, text

from ccat_assets.cli import EXIT_ERROR
from ccat_dt.config import load_config
from ccat_dt.defaults import CONFIG_NAME
from ccat_dt.marker import MARKER
from ccat_dt.opsdb import database
from ccat_dt.opsdb.database import MIGRATIONS, OpsDB, SchemaOutOfDate, _alembic_config
from ccat_dt.opsdb.models import OperationStatus, OperationType, PackageState
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import deployment, observe, operations, package_names, package_state, run
from tests.faults.storage_truth import lost_filed_files
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parents[2]
NEXT = f"{int(database.schema_head()) + 1:04d}"
NEWER_MIGRATION = f'''"""a revision of a newer ccat-dt than this one

Revision ID: {NEXT}
Revises: {database.schema_head()}
"""

import sqlalchemy as sa
from alembic import op

revision = '{NEXT}'
down_revision = '{database.schema_head()}'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('operations', sa.Column('newer_code', sa.Integer(), nullable=False,
                                          server_default=sa.text('0')))


def downgrade() -> None:
    op.drop_column('operations', 'newer_code')
'''


def newer_code(tmp_path: Path) -> Path:
    """The migrations of a newer ccat-dt: this code's and one more revision."""
    migrations = tmp_path / "newer_migrations"
    shutil.copytree(MIGRATIONS, migrations, ignore=shutil.ignore_patterns("__pycache__"))
    (migrations / "versions" / f"{NEXT}_newer_code.py").write_text(NEWER_MIGRATION)
    return migrations


def migrated_by_newer_code(url: str, migrations: Path) -> None:
    cfg = _alembic_config(url)
    cfg.set_main_option("script_location", str(migrations))
    command.upgrade(cfg, "head")


def revision(url: str) -> str:
    engine = create_engine(url)
    with engine.connect() as connection:
        found = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()
    return str(found)


def test_an_opsdb_migrated_by_newer_code_is_refused_with_one_line_saying_to_upgrade(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("init", str(tmp_path / "dep")) == 0
    path = tmp_path / "dep" / CONFIG_NAME
    url = load_config(path).opsdb_url
    migrated_by_newer_code(url, newer_code(tmp_path))  # another host already upgraded
    capsys.readouterr()

    done = subprocess.run([sys.executable, "-m", "ccat_assets.cli", "--config", str(path),
                           "migrate"], capture_output=True, text=True, cwd=REPO,
                          stdin=subprocess.DEVNULL, timeout=300, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"is at schema revision {NEXT}, newer than this code's" in lines[0]
    assert "upgrade ccat-dt" in lines[0]
    assert revision(url) == NEXT  # nothing taken back

    for argv in (["drive"], ["purge"], ["status"]):
        assert run_cli("--config", str(path), *argv) == 2, argv
        err = capsys.readouterr().err
        assert "newer than this code's" in err and "upgrade ccat-dt" in err, argv
        assert "run `ccat-dt init` (or `ccat-dt migrate`)" not in err, argv


def test_a_process_that_outlived_an_upgrade_is_refused_at_its_next_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Celery worker (or the daemon, or a drive) started with this code keeps its OpsDB
    open; the code is upgraded on disk and `migrate` run by the new code. Its next run is
    refused (SchemaOutOfDate, saying to upgrade and restart), not run with the old models."""
    from resources.deployment import Deployment

    assert run_cli("init", str(tmp_path / "dep")) == 0
    path = tmp_path / "dep" / CONFIG_NAME
    url = load_config(path).opsdb_url
    assert Deployment(config_path=str(path)).opsdb is not None  # a run before the upgrade

    migrations = newer_code(tmp_path)
    monkeypatch.setattr(database, "MIGRATIONS", migrations)  # the code on disk replaced
    migrated_by_newer_code(url, migrations)  # and `ccat-dt migrate` run by the new code

    with pytest.raises(SchemaOutOfDate, match=f"revision {NEXT}, newer than this code's"):
        _ = Deployment(config_path=str(path)).opsdb  # the worker's next run
    with pytest.raises(SchemaOutOfDate, match="upgrade ccat-dt"):
        OpsDB(url)  # a command of the old process, opening the OpsDB anew


def test_an_archive_site_removed_while_its_copy_is_in_flight_leaves_the_package_archived(
        tmp_path: Path, instance: DagsterInstance, capsys: pytest.CaptureFixture[str]) -> None:
    config = deployment(tmp_path / "d", policies={"max_attempts": 5,
                                                  "retry_backoff_first_s": 0.2})
    opsdb = OpsDB(config.opsdb_url)
    (config.resolve_root("sites/us/buffer") / MARKER).unlink()  # us's disk gone: in flight
    observe(config, opsdb, files=2)
    run(config, instance, wait_s=0)
    [package] = package_names(opsdb)
    assert package_state(opsdb, package) == PackageState.TRANSFERRING  # at cologne only
    assert OperationStatus.FAILED in [status for status, _ in
                                      operations(opsdb, OperationType.TRANSFER)]

    settings = yaml.safe_load(config.path.read_text())  # the operator gives up on us
    settings["sites"] = [s for s in settings["sites"] if s["short_name"] != "us"]
    settings["routes"] = [r for r in settings["routes"]
                          if "us" not in (r["origin"], r["destination"])]
    config.path.write_text(yaml.safe_dump(settings, sort_keys=False))
    config = load_config(config.path)
    assert run_cli("--config", str(config.path), "migrate") == 0
    run(config, instance)

    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
    assert package_state(opsdb, package) == PackageState.ARCHIVED
    capsys.readouterr()
    assert run_cli("--config", str(config.path), "status") == 0
    assert "1 archived" in capsys.readouterr().out


def test_the_filing_service_journals_once_a_newer_ccat_dt_migrated_its_opsdb(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The filing service runs for months with one OpsDB open; a newer ccat-dt migrates it.
    Its requests are journaled (acknowledged, applied once it is upgraded and restarted),
    not written with its old models into the new schema, and it says why."""
    from ccat_dt.service import core
    from ccat_dt.service.core import FilingService
    from ccat_dt.service.tokens import create_token

    assert run_cli("init", str(tmp_path / "dep")) == 0
    config = load_config(tmp_path / "dep" / CONFIG_NAME)
    opsdb = OpsDB(config.opsdb_url)
    secret = create_token(opsdb, config, name="primecam-daq", site="ccat",
                          instruments=["primecam"])
    opsdb.dispose()
    service = FilingService(config)
    token = service.authenticate(secret)
    assert service.start_observation(token, "obs-1").status == 201  # applied

    monkeypatch.setattr(core, "SCHEMA_EVERY_S", 0.0, raising=False)
    migrated_by_newer_code(config.opsdb_url, newer_code(tmp_path))
    ack = service.start_observation(token, "obs-2")

    assert ack.status == 202  # journaled
    assert not service.reachable and "newer than this code's" in (service.last_error or "")
    engine = create_engine(config.opsdb_url)
    with engine.connect() as connection:
        assert [name for (name,) in connection.execute(
            text("SELECT name FROM executed_obs_units ORDER BY id"))] == ["obs-1"]
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_migrates_at_once_both_succeed_and_the_schema_is_migrated_once(
        tmp_path: Path, request: pytest.FixtureRequest, backend: str) -> None:
    """Two hosts (or an operator and a deployment script) run `migrate` at the same time: the
    second waits for the first and finds the schema migrated (before: "table already exists"
    or "column already exists", worded as the database being down)."""
    from ccat_dt.defaults import write_default_config

    overrides = ({"opsdb_url": request.getfixturevalue("postgres_url")}
                 if backend == "postgresql" else {})
    path = write_default_config(tmp_path / "dep", overrides=overrides)
    url = load_config(path).opsdb_url
    racers = [subprocess.Popen([sys.executable, "-m", "ccat_assets.cli", "--config", str(path),
                                "migrate"], cwd=REPO, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(3)]
    outcomes = [(racer.wait(timeout=300), racer.stderr.read() if racer.stderr else "")
                for racer in racers]

    assert [rc for rc, _ in outcomes] == [0, 0, 0], outcomes
    assert revision(url) == database.schema_head()
    OpsDB(url).dispose()  # opens: the schema is this code's


def test_a_migrate_behind_a_session_holding_a_table_gives_up_naming_it_and_changes_nothing(
        tmp_path: Path, postgres_url: str) -> None:
    """`ccat-dt migrate` of a PostgreSQL OpsDB while another session holds a table the upgrade
    alters (a psql left `idle in transaction`, a process stopped mid-transaction): the upgrade
    waits the lock timeout, then gives up whole, naming the session and how to end it; the
    schema is left at its revision, and once the session is gone `migrate` goes through.
    Before: it waited for ever, and every query on that table queued behind its ALTER."""
    from ccat_dt.defaults import write_default_config

    path = write_default_config(tmp_path / "dep", overrides={"opsdb_url": postgres_url})
    command.upgrade(_alembic_config(postgres_url), "0013")  # 0014 alters raw_data_packages
    holder = create_engine(postgres_url).connect()
    holder.execute(text("SELECT count(*) FROM raw_data_packages"))  # open, then left idle
    pid = holder.execute(text("SELECT pg_backend_pid()")).scalar()
    migrate = [sys.executable, "-m", "ccat_assets.cli", "--config", str(path), "migrate"]
    env = {**os.environ, database.LOCK_TIMEOUT_ENV: "2"}
    try:
        blocked = subprocess.run(migrate, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                 capture_output=True, text=True, timeout=120)
        assert blocked.returncode == EXIT_ERROR, blocked.stderr
        assert f"pid {pid} (user " in blocked.stderr
        assert "idle in transaction" in blocked.stderr
        assert "pg_terminate_backend" in blocked.stderr
        assert "still at revision 0013" in blocked.stderr
        assert revision(postgres_url) == "0013"
        engine = create_engine(postgres_url)
        with engine.connect() as connection:
            columns = set(connection.execute(text(
                "SELECT column_name FROM information_schema.columns WHERE table_schema ="
                " current_schema() AND table_name = 'raw_data_packages'")).scalars())
        engine.dispose()
        assert "verified_lta_sites" not in columns  # the whole upgrade rolled back
    finally:
        holder.close()
        holder.engine.dispose()

    done = subprocess.run(migrate, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert revision(postgres_url) == database.schema_head()

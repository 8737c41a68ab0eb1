"""The totals the database keeps (ccat_dt/opsdb/totals.py) equal a fresh COUNT/SUM of the
tables, whatever wrote the rows: the lifecycle's own code, raw SQL, a migration, two processes
at once; on SQLite and on PostgreSQL."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from alembic import command
from dagster import DagsterInstance
from sqlalchemy import create_engine, text

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import write_default_config
from ccat_dt.opsdb import totals
from ccat_dt.opsdb.database import OpsDB, _alembic_config, create_opsdb_engine, migrate
from ccat_dt.report import summarize
from ccat_dt.topology import prepare_opsdb
from tests.helpers import observe


@pytest.fixture(params=["sqlite", "postgresql"])
def opsdb_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))  # skipped without a server
    return f"sqlite:///{tmp_path / 'opsdb.sqlite'}"


@pytest.fixture
def deployment(opsdb_url: str, tmp_path: Path) -> Config:
    config = load_config(write_default_config(tmp_path / "deploy",
                                              overrides={"opsdb_url": opsdb_url}))
    prepare_opsdb(config)
    return config


def kept_and_counted(url: str) -> tuple[dict[totals.Key, tuple[int, int]],
                                        dict[totals.Key, tuple[int, int]]]:
    engine = create_opsdb_engine(url)
    with engine.connect() as connection:
        found = totals.read(connection), totals.recount(connection)
    engine.dispose()
    return found


def test_totals_equal_a_fresh_count_after_a_lifecycle_and_raw_sql(
        deployment: Config, tmp_path: Path) -> None:
    url = deployment.opsdb_url
    opsdb = OpsDB(url)
    source = observe(deployment, opsdb, observations=2, files=2)
    tampered = next((source / "obs-1").rglob("scan-0.dat"))  # its package fails packaging
    tampered.write_bytes(b"changed after filing" + tampered.read_bytes())
    home = tmp_path / "dagster_home"
    home.mkdir()
    with DagsterInstance.from_config(str(home)) as instance:
        report = drive(build_definitions(deployment), instance, wait_s=0)
    assert report.failed, "the tampered package's packaging fails"

    kept, counted = kept_and_counted(url)
    assert kept == counted
    statuses = {(subject, status) for subject, _, status in kept}
    assert {("copy", "deleted"), ("package", "archived"), ("package", "failed"),
            ("operation", "deletion/completed"), ("operation", "packaging/failed")} <= statuses

    engine = create_opsdb_engine(url)
    with engine.begin() as db:  # what an operator or a migration might do by hand
        db.execute(text("UPDATE physical_copies SET status = 'corrupt' WHERE id = "
                        "(SELECT min(id) FROM physical_copies WHERE status = 'present')"))
        db.execute(text("UPDATE raw_data_files SET size = size + 1"))
        db.execute(text("DELETE FROM operations WHERE operation_type = 'verification'"))
        db.execute(text("DELETE FROM physical_copies WHERE status = 'deleted' AND id NOT IN "
                        "(SELECT copy_id FROM operations WHERE copy_id IS NOT NULL)"))
        db.execute(text("INSERT INTO physical_copies (kind, location_id, relative_path, size, "
                        "status, checksum, created_at) SELECT kind, location_id, "
                        "relative_path || '.again', size, 'staged', checksum, created_at "
                        "FROM physical_copies"))
    with pytest.raises(Exception, match="rolled back"), engine.begin() as db:
        db.execute(text("DELETE FROM physical_copies WHERE status = 'staged'"))
        raise Exception("rolled back")  # noqa: TRY002 - the totals roll back with the rows
    engine.dispose()

    kept, counted = kept_and_counted(url)
    assert kept == counted
    summary = summarize(opsdb)  # what `ccat-dt status` prints, from the totals
    assert summary.packages["failed"] == 1
    assert summary.failed_operations >= 1
    assert sum(line.corrupt for line in summary.locations) == 1
    assert summary.files == sum(n for (subject, _, _), (n, _) in counted.items()
                                if subject == "raw_file")
    opsdb.dispose()


def test_migration_fills_the_totals_from_the_rows_already_there(opsdb_url: str) -> None:
    command.upgrade(_alembic_config(opsdb_url), "0011")
    engine = create_engine(opsdb_url)
    with engine.begin() as db:
        db.execute(text("INSERT INTO sites (id, short_name, name, description) "
                        "VALUES (1, 'ccat', 'CCAT', '')"))
        db.execute(text("INSERT INTO data_locations (id, site_id, name, location_type, "
                        "storage_type, priority, root) VALUES (1, 1, 'buffer', 'buffer', "
                        "'disk', 0, '/data'), (2, 1, 'other', 'buffer', 'disk', 1, '/other')"))
        for n, (location, status) in enumerate([(1, "present"), (1, "present"),
                                                (1, "deleted"), (2, "present")]):
            db.execute(text("INSERT INTO physical_copies (kind, location_id, relative_path, "
                            "size, status, checksum, created_at) VALUES ('package', "
                            f":location, 'p{n}.tar', :size, :status, 'abc', "
                            "'2026-01-01 00:00:00')"),
                       {"location": location, "size": 10 ** n, "status": status})
    engine.dispose()

    migrate(opsdb_url)

    kept, counted = kept_and_counted(opsdb_url)
    assert kept == counted == {("copy", 1, "present"): (2, 11), ("copy", 1, "deleted"): (1, 100),
                               ("copy", 2, "present"): (1, 1000)}


WRITES = 150


def _write_copies(url: str, tag: str, start: multiprocessing.synchronize.Event) -> None:
    """One writer process: copies inserted and then marked deleted, one transaction each."""
    engine = create_opsdb_engine(url)
    start.wait()
    for n in range(WRITES):
        with engine.begin() as db:
            copy_id = db.execute(text(
                "INSERT INTO physical_copies (kind, location_id, relative_path, size, status, "
                "checksum, created_at) SELECT 'package', min(id), :path, 7, 'present', 'abc', "
                "CURRENT_TIMESTAMP FROM data_locations RETURNING id"),
                {"path": f"{tag}-{n}.tar"}).scalar_one()
        if n % 2:
            with engine.begin() as db:
                db.execute(text("UPDATE physical_copies SET status = 'deleted' WHERE id = :id"),
                           {"id": copy_id})
    engine.dispose()


def test_two_processes_writing_at_once_lose_no_counts(deployment: Config) -> None:
    url = deployment.opsdb_url
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    writers = [context.Process(target=_write_copies, args=(url, tag, start))
               for tag in ("a", "b")]
    for writer in writers:
        writer.start()
    start.set()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0

    kept, counted = kept_and_counted(url)
    assert kept == counted
    first = min(location for subject, location, _ in kept if subject == "copy")
    assert kept[("copy", first, "present")] == (WRITES, 7 * WRITES)
    assert kept[("copy", first, "deleted")] == (WRITES, 7 * WRITES)

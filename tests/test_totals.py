"""The totals the database keeps (ccat_dt/opsdb/totals.py), and each package's count of sites
with a verified LTA copy (ccat_dt/opsdb/archived_sites.py), equal a fresh count of the tables,
whatever wrote the rows: the lifecycle's own code, raw SQL, a migration, two processes at once;
on SQLite and on PostgreSQL."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
from alembic import command
from dagster import DagsterInstance
from sqlalchemy import create_engine, text

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import write_default_config
from ccat_dt.opsdb import archived_sites, totals
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


def sites_kept_and_counted(url: str) -> tuple[dict[int, int], dict[int, int]]:
    engine = create_opsdb_engine(url)
    with engine.connect() as connection:
        found = archived_sites.read(connection), archived_sites.recount(connection)
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
    sites, recounted = sites_kept_and_counted(url)
    assert sites == recounted
    assert sorted(set(sites.values())) == [0, 2], "archived packages in 2 sites, 1 failed"
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
        # an LTA copy found missing; another one's record re-verified (no change of count);
        # an LTA copy of another package moved to a buffer location by hand
        db.execute(text(f"UPDATE physical_copies SET status = 'missing' WHERE id = "
                        f"(SELECT min(c.id) FROM physical_copies c {LTA_COPY})"))
        db.execute(text(f"UPDATE physical_copies SET verified_at = created_at WHERE id = "
                        f"(SELECT max(c.id) FROM physical_copies c {LTA_COPY})"))
        db.execute(text(f"UPDATE physical_copies SET location_id = (SELECT min(id) FROM "
                        f"data_locations WHERE location_type = 'buffer') WHERE id = "
                        f"(SELECT max(c.id) FROM physical_copies c {LTA_COPY} AND c.package_id "
                        f"<> (SELECT min(package_id) FROM physical_copies {LTA_COPY}))"))
    with pytest.raises(Exception, match="rolled back"), engine.begin() as db:
        db.execute(text("DELETE FROM physical_copies WHERE status = 'staged'"))
        raise Exception("rolled back")  # noqa: TRY002 - the totals roll back with the rows
    engine.dispose()

    kept, counted = kept_and_counted(url)
    assert kept == counted
    sites, recounted = sites_kept_and_counted(url)
    assert sites == recounted
    assert sorted(set(sites.values())) == [0, 1, 2], "two packages lost an LTA site"
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


def test_migration_counts_the_verified_lta_sites_of_the_packages_already_there(
        opsdb_url: str) -> None:
    command.upgrade(_alembic_config(opsdb_url), "0013")
    engine = create_engine(opsdb_url)
    with engine.begin() as db:
        db.execute(text("INSERT INTO sites (id, short_name, name, description) "
                        "VALUES (1, 'a', 'A', ''), (2, 'b', 'B', '')"))
        db.execute(text("INSERT INTO data_locations (id, site_id, name, location_type, "
                        "storage_type, priority, root) VALUES "
                        "(1, 1, 'lta', 'long_term_archive', 'disk', 0, '/a'), "
                        "(2, 2, 'lta', 'long_term_archive', 'disk', 0, '/b'), "
                        "(3, 2, 'buffer', 'buffer', 'disk', 1, '/c')"))
        db.execute(text("INSERT INTO instrument_modules (id, instrument, name) "
                        "VALUES (1, 'test', 'm')"))
        db.execute(text("INSERT INTO executed_obs_units (id, uuid, name, status, started_at) "
                        "VALUES (1, 'u-1', 'obs-1', 'finished', '2026-01-01 00:00:00')"))
        for package in (1, 2, 3):
            db.execute(text("INSERT INTO raw_data_packages (id, uuid, name, observation_id, "
                            "module_id, part, state, primary_site_id, created_at) VALUES "
                            "(:id, :name, :name, 1, 1, :id, 'transferring', 1, "
                            "'2026-01-01 00:00:00')"), {"id": package, "name": f"p{package}"})
        # (package, location, verified): both LTAs; one LTA and a buffer; an unverified LTA
        for n, (package, location, verified) in enumerate(
                [(1, 1, True), (1, 2, True), (2, 1, True), (2, 3, True), (3, 2, False)]):
            db.execute(text("INSERT INTO physical_copies (kind, location_id, relative_path, "
                            "size, status, checksum, created_at, verified_at, package_id) "
                            "VALUES ('package', :location, :path, 1, 'present', 'abc', "
                            "'2026-01-01 00:00:00', :verified, :package)"),
                       {"location": location, "path": f"c{n}.tar", "package": package,
                        "verified": "2026-01-02 00:00:00" if verified else None})
    engine.dispose()

    migrate(opsdb_url)

    assert sites_kept_and_counted(opsdb_url) == ({1: 2, 2: 1, 3: 0}, {1: 2, 2: 1, 3: 0})


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


LTA_COPY = ("JOIN data_locations l ON l.id = c.location_id WHERE l.location_type = "
            "'long_term_archive' AND c.status = 'present' AND c.package_id IS NOT NULL")


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


def _archive_each_package_at(url: str, site: str, packages: list[int],
                             start: multiprocessing.synchronize.Barrier) -> None:
    """One archive site's writer: each package's verified LTA copy, in a transaction that
    stays open a moment after its insert, while the other site's writer does the same."""
    engine = create_opsdb_engine(url)
    for package in packages:
        start.wait(timeout=60)
        with engine.begin() as db:
            db.execute(text(
                "INSERT INTO physical_copies (kind, location_id, relative_path, size, status, "
                "checksum, created_at, verified_at, package_id) SELECT 'package', l.id, :path, "
                "7, 'present', 'abc', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, :package "
                "FROM data_locations l JOIN sites s ON s.id = l.site_id "
                "WHERE s.short_name = :site AND l.location_type = 'long_term_archive'"),
                {"path": f"{site}-{package}.tar", "package": package, "site": site})
            time.sleep(0.02)
    engine.dispose()


def test_two_sites_verifying_the_same_packages_at_once_count_both(deployment: Config) -> None:
    url = deployment.opsdb_url
    packages = _packages(url, 12)
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    writers = [context.Process(target=_archive_each_package_at, args=(url, site, packages, start))
               for site in ("cologne", "us")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0

    sites, recounted = sites_kept_and_counted(url)
    assert sites == recounted == dict.fromkeys(packages, 2)


def _packages(url: str, count: int) -> list[int]:
    """`count` packages with no copies yet, made by hand."""
    engine = create_opsdb_engine(url)
    with engine.begin() as db:
        db.execute(text("INSERT INTO instrument_modules (id, instrument, name) "
                        "VALUES (901, 'test', 'm')"))
        db.execute(text("INSERT INTO executed_obs_units (id, uuid, name, status, started_at) "
                        "VALUES (901, 'u-901', 'obs-901', 'finished', CURRENT_TIMESTAMP)"))
        for part in range(count):
            db.execute(text(
                "INSERT INTO raw_data_packages (uuid, name, observation_id, module_id, part, "
                "state, primary_site_id, created_at) SELECT :uuid, :name, 901, 901, :part, "
                "'transferring', min(id), CURRENT_TIMESTAMP FROM sites"),
                {"uuid": f"p-{part}", "name": f"pkg-{part}", "part": part})
        made = [int(n) for n in db.execute(text("SELECT id FROM raw_data_packages "
                                                "ORDER BY id")).scalars()]
    engine.dispose()
    return made

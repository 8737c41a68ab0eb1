"""Schema upgrades keep the data an OpsDB already holds (SQLite copies tables to alter them)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import create_engine, text

from ccat_dt.opsdb.database import OpsDB, _alembic_config, check_schema, migrate


def test_upgrade_from_the_first_revision_keeps_copies_and_operations(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'opsdb.sqlite'}"
    command.upgrade(_alembic_config(url), "0001")
    engine = create_engine(url)
    with engine.begin() as db:
        db.execute(text("INSERT INTO sites (id, short_name, name, description) "
                        "VALUES (1, 'ccat', 'CCAT', '')"))
        db.execute(text("INSERT INTO data_locations (id, site_id, name, location_type, "
                        "storage_type, priority, root) VALUES (1, 1, 'buffer', 'buffer', "
                        "'disk', 0, '/data')"))
        db.execute(text("INSERT INTO physical_copies (id, kind, location_id, relative_path, "
                        "size, status, checksum, created_at) VALUES (7, 'package', 1, 'a.tar', "
                        "10, 'present', 'abc', '2026-01-01 00:00:00')"))
        db.execute(text("INSERT INTO operations (id, operation_type, status, copy_id, "
                        "retry_count, started_at) VALUES (3, 'transfer', 'completed', 7, 0, "
                        "'2026-01-01 00:00:00')"))
    engine.dispose()

    migrate(url)

    opsdb = OpsDB(url)  # raises if the schema is not at head
    with opsdb.session() as session:
        assert session.execute(text("SELECT id, relative_path, staging_request_id "
                                    "FROM physical_copies")).all() == [(7, "a.tar", None)]
        assert session.execute(text("SELECT id, copy_id, log_path FROM operations")).all() == [
            (3, 7, None)]
        assert session.execute(text("PRAGMA foreign_key_check")).all() == []
    check_schema(opsdb.engine)
    opsdb.dispose()

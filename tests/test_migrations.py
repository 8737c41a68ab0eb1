"""Schema upgrades keep the data an OpsDB already holds (SQLite copies tables to alter them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from ccat_dt.opsdb.database import (
    OpsDB,
    SchemaOutOfDate,
    _alembic_config,
    check_schema,
    migrate,
)


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


def test_the_head_read_from_file_names_is_alembics_head_and_files_carry_their_revision(
        tmp_path: Path) -> None:
    """OpsDB() compares against schema_head() (no Alembic import); that holds only while each
    migration file is named after its revision and they form one line."""
    from alembic.script import ScriptDirectory

    from ccat_dt.opsdb.database import MIGRATIONS, schema_head

    scripts = ScriptDirectory.from_config(_alembic_config("sqlite://"))
    assert scripts.get_heads() == [schema_head()]
    for revision in scripts.walk_revisions():
        assert Path(revision.path).name.startswith(f"{revision.revision}_")
    assert len(list((MIGRATIONS / "versions").glob("[0-9]*_*.py"))) == len(
        list(scripts.walk_revisions()))
    url = f"sqlite:///{tmp_path / 'behind.sqlite'}"
    command.upgrade(_alembic_config(url), "0001")
    with pytest.raises(SchemaOutOfDate, match=f"revision 0001, expected {schema_head()}"):
        OpsDB(url)


def test_the_partial_indexes_the_models_name_are_those_the_migrations_create(
        tmp_path: Path) -> None:
    """The models state each partial index's WHERE in `info` (not as dialect arguments, which
    would import the dialects: ccat_dt/opsdb/models.py); a migrated OpsDB has exactly those."""
    from ccat_dt.opsdb.models import Base

    url = f"sqlite:///{tmp_path / 'opsdb.sqlite'}"
    migrate(url)
    engine = create_engine(url)
    with engine.connect() as db:
        created = {name: sql.split(" WHERE ", 1)[1] for name, sql in db.execute(text(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql LIKE '% WHERE %'"))}
    engine.dispose()
    stated = {index.name: index.info["where"] for table in Base.metadata.tables.values()
              for index in table.indexes if "where" in index.info}
    assert stated == created

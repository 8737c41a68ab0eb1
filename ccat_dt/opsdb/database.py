"""Opening the OpsDB: engines, sessions and Alembic migrations (never `create_all`)."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:  # Alembic is imported only to migrate: every command opens an OpsDB
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).parent / "migrations"
LOCK_TIMEOUT_ENV = "CCAT_DT_OPSDB_LOCK_TIMEOUT_S"  # how long an OpsDB lock is waited for
LOCK_TIMEOUT_S = 30.0
# PostgreSQL: a server that takes the connection and never answers (its host hung on I/O, a
# stopped postmaster) is given up on after this (libpq's connect_timeout; none: for ever).
PG_CONNECT_TIMEOUT_S = 10


class SchemaOutOfDate(Exception):
    """The OpsDB has not been migrated to the schema this code expects."""


def _alembic_config(url: str) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_inherited: list[object] = []  # in a forked child: the parent's pools, never closed


def _forget_inherited_connections() -> None:
    """In a forked child (the drive's run processes): the pooled connections are the parent's
    (its sockets, its SQLite handles); the child opens its own. The parent's are kept
    referenced, so that no garbage collection closes them from here (a PostgreSQL
    connection closed by the child would be ended for the parent too)."""
    for engine in list(_engines):
        _inherited.append(engine.pool)
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_inherited_connections)


def dispose_engines() -> None:
    """Close the pooled connections of every engine this process opened (a command's last
    step: a SQLite OpsDB's last connection to close checkpoints its write-ahead log)."""
    for engine in list(_engines):
        engine.dispose()


def create_opsdb_engine(url: str) -> Engine:
    engine = _create_engine(url)
    _engines.add(engine)
    return engine


def lock_timeout_s() -> float:
    return float(os.environ.get(LOCK_TIMEOUT_ENV) or LOCK_TIMEOUT_S)


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": lock_timeout_s()})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()

        return engine
    return _postgres_engine(url)


def _postgres_engine(url: str) -> Engine:
    """A lock another session holds (an `idle in transaction` psql, a `LOCK TABLE`, a VACUUM
    FULL, a process stopped in the middle of a transaction) is waited for `lock_timeout_s()`,
    as SQLite's busy timeout, then the statement fails (SQLSTATE 55P03), its step is retried
    and re-attempted like any OpsDB fault. PostgreSQL waits for ever by default: a drive, its
    runs and the daemon's sensor ticks hung on such a lock with nobody told. Set with SET on
    each new connection, not as a startup `options` (which pgbouncer refuses); a URL's own
    `options=-c lock_timeout=...` or `connect_timeout` is kept."""
    parsed = make_url(url)
    connect_args: dict[str, object] = {}
    if parsed.get_driver_name() in ("psycopg2", "psycopg") and "connect_timeout" not in \
            parsed.query:  # a libpq parameter
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    if engine.dialect.name != "postgresql" or "lock_timeout" in str(
            parsed.query.get("options", "")):
        return engine
    milliseconds = max(1, round(lock_timeout_s() * 1000))

    @event.listens_for(engine, "connect")
    def _lock_timeout(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET lock_timeout = {milliseconds}")
        cursor.close()
        dbapi_connection.commit()  # a SET in a transaction rolled back would be undone

    return engine


def migrate(url: str) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    from alembic import command

    engine = _create_engine(url)
    try:  # a newer schema: Alembic would fail on the revision it does not know (a traceback)
        newer = _newer_than_code(_current_revision(engine), schema_head())
    finally:
        engine.dispose()
    if newer:
        raise SchemaOutOfDate(f"OpsDB at {engine.url!r} {newer}")
    command.upgrade(_alembic_config(url), "head")


def schema_head() -> str:
    """The newest revision: migrations are chained linearly and each file is named after its
    revision ("0007_notifications.py" is revision 0007; tests/test_migrations.py holds Alembic
    to it). Read from the file names, so that opening the OpsDB needs no Alembic import."""
    return max(p.name.split("_", 1)[0] for p in (MIGRATIONS / "versions").glob("[0-9]*_*.py"))


HEAD = schema_head()  # this code's schema, read once: what its models were written for


def _current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return (connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
                if inspect(connection).has_table("alembic_version") else None)


def _newer_than_code(current: str | None, head: str) -> str | None:
    """What to tell when the OpsDB's schema is newer than this code's (a newer ccat-dt
    migrated it): this code does not know the tables, and `migrate` cannot take them back."""
    if current is None or current <= head:
        return None
    return (f"is at schema revision {current}, newer than this code's {head} (migrated by a "
            "newer ccat-dt): upgrade ccat-dt here (and restart its services) to that "
            "version; `migrate` cannot take a schema back")


def check_schema(engine: Engine) -> None:
    """Raise SchemaOutOfDate unless the OpsDB is at the newest revision this process was
    started with (not the files on disk now: code upgraded under a running process must not
    make its old models pass for the new schema)."""
    head = HEAD
    current = _current_revision(engine)
    if current == head:
        return
    if newer := _newer_than_code(current, head):
        raise SchemaOutOfDate(f"OpsDB at {engine.url!r} {newer}")
    raise SchemaOutOfDate(
        f"OpsDB at {engine.url!r} is at schema revision {current or 'none'}, expected {head}: "
        "run `ccat-dt init` (or `ccat-dt migrate`) first")


class OpsDB:
    """A handle on one OpsDB: hands out short transactions."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_opsdb_engine(url)
        check_schema(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()

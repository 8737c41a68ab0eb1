"""Opening the OpsDB: engines, sessions and Alembic migrations (never `create_all`)."""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import URL, Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:  # Alembic is imported only to migrate: every command opens an OpsDB
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).parent / "migrations"
LOCK_TIMEOUT_ENV = "CCAT_DT_OPSDB_LOCK_TIMEOUT_S"  # how long an OpsDB lock is waited for
LOCK_TIMEOUT_S = 30.0
# PostgreSQL: a server that takes the connection and never answers (its host hung on I/O, a
# stopped postmaster) is given up on after this (libpq's connect_timeout; none: for ever).
PG_CONNECT_TIMEOUT_S = 10
# PostgreSQL: a network path that goes silent (a firewall or NAT forgetting the connection, a
# VPN or link down, the server's host gone: packets black-holed, no RST, no FIN) while a
# statement waits for its answer, or while a pooled connection is idle, is given up on after
# about this long: data sent and not acknowledged so long (libpq's tcp_user_timeout), or TCP
# keepalive probes unanswered (sent after a third of it without a packet, then every sixth),
# end the connection with an error ("could not receive data from server: Connection timed
# out"), an OpsDB fault retried and re-attempted like a server restart; the next connection,
# once the path is back, works. Without it a drive, its runs, a sensor tick or a command
# waited for ever on a read that never returned, with nobody told. The server is asked the
# same for its side of the session (tcp_keepalives_*, tcp_user_timeout), so that a cut
# session's transaction is rolled back and its locks are released, not kept until the
# server's own keepalive (2 h by default). A statement that runs long on a live path is not
# concerned: the kernels acknowledge and answer the probes. A URL's own parameters are kept
# (`keepalives_idle=...`, `tcp_user_timeout=...`; the server's side follows them).
LINK_TIMEOUT_ENV = "CCAT_DT_OPSDB_LINK_TIMEOUT_S"
PG_LINK_TIMEOUT_S = 30.0
# libpq's parameter (URL query, connect_args) -> the server's session setting for its side
_SERVER_SIDE = {"keepalives_idle": "tcp_keepalives_idle",
                "keepalives_interval": "tcp_keepalives_interval",
                "keepalives_count": "tcp_keepalives_count",
                "tcp_user_timeout": "tcp_user_timeout"}


class SchemaOutOfDate(Exception):
    """The OpsDB has not been migrated to the schema this code expects."""


class MigrationBlocked(Exception):
    """A migration gave up waiting for a table another OpsDB session holds: nothing changed."""


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


def create_opsdb_engine(url: str, lock_wait_s: float | None = None) -> Engine:
    """`lock_wait_s`: how long a statement waits for a lock another session holds, when not
    `lock_timeout_s()`."""
    engine = _create_engine(url, lock_timeout_s() if lock_wait_s is None else lock_wait_s)
    _engines.add(engine)
    return engine


# SQLSTATEs of a transaction PostgreSQL aborted for a conflict with a concurrent one, not for
# a fault: run again at once, it goes through (psycopg's DeadlockDetected, SerializationFailure;
# SQLAlchemy raises them as OperationalError, as it does a lost connection).
CONFLICTS = {"40P01": "deadlock detected", "40001": "serialization failure"}


LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for a lock_timeout that ran out


def _sqlstate(exc: BaseException) -> str | None:
    if not isinstance(exc, DBAPIError):
        return None
    code = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlstate", None)
    return str(code) if code else None


def conflict_of(exc: BaseException) -> str | None:
    """The conflict `exc` aborted its transaction for (CONFLICTS), or None for any other error."""
    code = _sqlstate(exc)
    return CONFLICTS.get(code) if code else None


def lock_timed_out(exc: BaseException) -> bool:
    """`exc` is PostgreSQL giving up, after lock_timeout, a lock another session holds
    (SQLSTATE 55P03): contention with a live server, not a lost link; the transaction was
    rolled back, and it goes through once that session lets go."""
    return _sqlstate(exc) == LOCK_NOT_AVAILABLE


QUERY_CANCELED = "57014"  # PostgreSQL's query_canceled


def statement_canceled(exc: BaseException) -> bool:
    """`exc` is PostgreSQL cancelling a statement (SQLSTATE 57014): a statement_timeout (a
    role's or the database's), or an administrator's pg_cancel_backend. The server is live
    and answering; the transaction was rolled back, and a later attempt may go through."""
    return _sqlstate(exc) == QUERY_CANCELED


READ_ONLY_TRANSACTION = "25006"  # PostgreSQL's read_only_sql_transaction


def takes_no_writes(exc: BaseException) -> bool:
    """`exc` is a write refused by a server that accepts only reads (SQLSTATE 25006): a
    standby after a failover, a primary demoted under a pooled connection, a database set
    `default_transaction_read_only` (as managed services do while its disk is full). OpsDB
    cannot take writes now, as if out of reach; a new connection may reach the primary."""
    return _sqlstate(exc) == READ_ONLY_TRANSACTION


def lock_timeout_s() -> float:
    return float(os.environ.get(LOCK_TIMEOUT_ENV) or LOCK_TIMEOUT_S)


def wait_for_locks_at_most(session: Session, seconds: float) -> None:
    """This transaction waits `seconds` for a lock another session holds, then fails as
    lock_timeout does (55P03), on PostgreSQL, whatever its connection's lock_timeout; SQLite's
    writers wait in their connection's busy timeout."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL lock_timeout = {max(1, round(seconds * 1000))}"))


def link_timeout_s() -> float:
    return float(os.environ.get(LINK_TIMEOUT_ENV) or PG_LINK_TIMEOUT_S)


def _libpq_defaults() -> dict[str, int]:
    timeout = link_timeout_s()
    return {"connect_timeout": PG_CONNECT_TIMEOUT_S, "keepalives": 1,
            "keepalives_idle": max(1, math.ceil(timeout / 3)),
            "keepalives_interval": max(1, math.ceil(timeout / 6)),
            "keepalives_count": 4, "tcp_user_timeout": max(1, round(timeout * 1000))}


def _libpq(url: str | URL) -> bool:
    return make_url(url).get_driver_name() in ("psycopg2", "psycopg")


def link_connect_args(url: str | URL) -> dict[str, object]:
    """The connect_args of a PostgreSQL engine through libpq: a server that never answers a
    new connection (PG_CONNECT_TIMEOUT_S) and a network path gone silent (PG_LINK_TIMEOUT_S)
    are waited for a bounded time. A parameter the URL sets itself is kept."""
    if not _libpq(url):
        return {}
    query = make_url(url).query
    return {key: value for key, value in _libpq_defaults().items() if key not in query}


def server_link_settings(url: str | URL) -> list[tuple[str, int]]:
    """The session settings that make the server give up a silent path as the client does
    (its keepalives and tcp_user_timeout, from the URL's libpq parameters or the defaults),
    each unless the URL's `options` sets it."""
    if not _libpq(url):
        return []
    parsed = make_url(url)
    effective: dict[str, object] = {**_libpq_defaults(), **parsed.query}
    options = str(parsed.query.get("options", ""))
    settings = []
    for key, name in _SERVER_SIDE.items():
        if name in options or (key != "tcp_user_timeout" and str(effective["keepalives"]) == "0"):
            continue
        try:
            settings.append((name, int(str(effective[key]))))
        except ValueError:  # libpq refuses the URL itself
            continue
    return settings


def set_on_connect(engine: Engine, settings: Sequence[tuple[str, int]]) -> None:
    """`SET name = value` on each new connection of a PostgreSQL engine: not as a startup
    `options`, which pgbouncer refuses. tcp_user_timeout only where the server has it
    (PostgreSQL 12 and newer)."""
    if engine.dialect.name != "postgresql" or not settings:
        return

    @event.listens_for(engine, "connect")
    def _settings(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        version = getattr(dbapi_connection, "server_version", None) or getattr(
            getattr(dbapi_connection, "info", None), "server_version", 0)
        cursor = dbapi_connection.cursor()
        for name, value in settings:
            if name != "tcp_user_timeout" or version >= 120000:
                cursor.execute(f"SET {name} = {int(value)}")
        cursor.close()
        dbapi_connection.commit()  # a SET in a transaction rolled back would be undone


def _create_engine(url: str, lock_wait_s: float) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": lock_wait_s})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()

        return engine
    return _postgres_engine(url, lock_wait_s)


def _postgres_engine(url: str, lock_wait_s: float) -> Engine:
    """A lock another session holds (an `idle in transaction` psql, a `LOCK TABLE`, a VACUUM
    FULL, a process stopped in the middle of a transaction) is waited for `lock_wait_s`
    (`lock_timeout_s()` unless the caller says),
    as SQLite's busy timeout, then the statement fails (SQLSTATE 55P03), its step is retried
    and re-attempted like any OpsDB fault. PostgreSQL waits for ever by default: a drive, its
    runs and the daemon's sensor ticks hung on such a lock with nobody told. A network path
    gone silent is given up on after `link_timeout_s()` the same way (PG_LINK_TIMEOUT_S). A
    URL's own `options=-c lock_timeout=...`, `connect_timeout`, keepalive or
    tcp_user_timeout is kept."""
    parsed = make_url(url)
    engine = create_engine(url, pool_pre_ping=True, connect_args=link_connect_args(parsed))
    milliseconds = max(1, round(lock_wait_s * 1000))
    own = "lock_timeout" in str(parsed.query.get("options", ""))
    set_on_connect(engine, [*([] if own else [("lock_timeout", milliseconds)]),
                            *server_link_settings(parsed)])
    return engine


def migrate(url: str) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    from alembic import command

    engine = _create_engine(url, lock_timeout_s())
    try:  # a newer schema: Alembic would fail on the revision it does not know (a traceback)
        newer = _newer_than_code(_current_revision(engine), schema_head())
    finally:
        engine.dispose()
    if newer:
        raise SchemaOutOfDate(f"OpsDB at {engine.url!r} {newer}")
    try:
        command.upgrade(_alembic_config(url), "head")
    except OperationalError as exc:
        if not lock_timed_out(exc):
            raise
        raise MigrationBlocked(_blocked_migration(url)) from exc


def _blocked_migration(url: str) -> str:
    """Who holds OpsDB tables, read once the migration rolled back: the sessions to end."""
    engine = create_engine(url, poolclass=NullPool, connect_args=link_connect_args(url))
    try:
        with engine.connect() as connection:
            revision = _current_revision(engine)
            holders = connection.execute(text(
                "SELECT DISTINCT a.pid, a.usename, a.application_name, a.client_addr, a.state,"
                " a.xact_start FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " JOIN pg_class c ON c.oid = l.relation"
                " WHERE l.granted AND l.pid <> pg_backend_pid()"
                " AND c.relnamespace = current_schema()::regnamespace"
                " ORDER BY a.xact_start LIMIT 5")).all()
    finally:
        engine.dispose()
    who = "; ".join(
        f"pid {pid} (user {user}{f', application {app}' if app else ''}, "
        f"from {addr or 'a local socket'}, "
        f"{state}, its transaction open since {since:%Y-%m-%d %H:%M:%S %Z})"
        for pid, user, app, addr, state, since in holders) or "a session that has ended since"
    return (f"OpsDB migration gave up after waiting {lock_timeout_s():g} s for a table that "
            f"another session holds: {who}. Nothing was changed (the schema is still at "
            f"revision {revision or 'none'}). End that session (`SELECT "
            "pg_terminate_backend(PID)` as a superuser) or stop the ccat-dt services using this "
            "OpsDB, then run `ccat-dt migrate` again")


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

    def __init__(self, url: str, *, lock_wait_s: float | None = None) -> None:
        self.url = url
        self.engine = create_opsdb_engine(url, lock_wait_s)
        check_schema(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self, *, undo: bool = False) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error; with `undo`
        rolled back in any case (what a change would be, not made: a stopped sensor's
        evaluation, which only the UI's "Test sensor" does)."""
        with self._sessions() as session, session.begin() as transaction:
            yield session
            if undo:
                transaction.rollback()

    def dispose(self) -> None:
        self.engine.dispose()


def insert_absent(session: Session, model: type[Any], values: dict[str, Any],
                  keys: Sequence[str]) -> None:
    """INSERT a row of `model` unless one with the same `keys` (a unique constraint or the
    primary key) is there, on SQLite and PostgreSQL alike (INSERT ... ON CONFLICT DO NOTHING):
    a row another transaction inserted at the same moment (two ticks of one sensor at once)
    is kept, not an IntegrityError that fails the transaction; PostgreSQL waits for that
    transaction to end first. The caller reads the row after, whoever inserted it. The
    dialect's module is imported only here, for the database in use."""
    statement: Any
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        statement = pg_insert(model)
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert
        statement = sqlite_insert(model)
    session.execute(statement.values(**values).on_conflict_do_nothing(index_elements=list(keys)))

"""Dagster's SQLite run and event storage (the same files as by default: runs.db, one event
file per run), without the costs they pay per call, which were most of a small package's
orchestration time (docs/benchmarks.md, section 5):

- Every call (each event of a run, each run lookup) made a new SQLAlchemy engine, so every
  statement was compiled again, and opened and closed a SQLite connection (closing the last
  connection to a WAL file checkpoints it; the next open reads the schema again). Here the
  engines are kept (per event file, the most recently used few), with their connections open
  between calls. A forked child (a drive's run) never uses its parent's open connections.
- Every new run's event file was created table by table, index by index, after reading
  Dagster's migration scripts twice (to learn the newest revision, then to stamp it); here an
  empty file is made so once per process, and each run's file is a copy of it.

- A new instance's files (runs.db, the event index, schedules.db) were made by whichever
  process opened the instance first, Dagster's way: create the tables, then stamp the schema
  revision, in separate steps. Two processes opening a new instance at once (`ccat-dt drive`
  and the UI, `dagster asset materialize`, the daemon) crashed ("table runs already exists",
  "UNIQUE constraint failed: alembic_version") or, worse, one found the other's tables not yet
  stamped, took them for an old instance and stamped an old revision next to the new one: every
  later command failed for ever ("alembic_version has more than one head"). Here one process
  at a time makes a storage's file (a file lock in its directory, `_creating`).

The files, tables, stamps and transactions are Dagster's own; only how often the work is done
changes. The embedded default's instance uses them (dagster.yaml, `run_storage`,
`event_log_storage` and `schedule_storage`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sqlite3
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import cache, partial
from typing import Any

import sqlalchemy as db
import sqlalchemy.orm  # noqa: F401  see ccat_assets/dagster_instance.py: for an older dagster.yaml
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from dagster._core.storage.event_log.schema import SqlEventLogStorageMetadata
from dagster._core.storage.event_log.sqlite import sqlite_event_log
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage
from dagster._core.storage.sql import get_alembic_config
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from dagster._daemon.types import DaemonHeartbeat
from dagster._serdes import ConfigurableClassData
from dagster.version import __version__ as dagster_version
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from ccat_assets.tags import DAEMON_PROCESS_KEY
from ccat_dt.transports.base import rename_into_place

LOG = logging.getLogger(__name__)

KEPT_ENGINES = 32  # run files written at once are few: the runs in flight, and the index
CREATE_LOCK = ".ccat-dt-create.lock"  # in a storage's directory: one process makes its files


@contextmanager
def _creating(base_dir: str) -> Iterator[None]:
    """While one process makes (or finds made) a storage's SQLite file in `base_dir`, no other
    does: Dagster creates the tables and stamps the revision in separate steps, and a second
    process in between takes the tables for an old instance's (module docstring). The kernel
    frees the lock if the holder dies."""
    os.makedirs(base_dir, exist_ok=True)
    with open(os.path.join(base_dir, CREATE_LOCK), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@cache
def _migrations() -> ScriptDirectory:
    """Dagster's event log migration scripts, read once per process."""
    return ScriptDirectory.from_config(get_alembic_config(sqlite_event_log.__file__))


def _empty_event_file(directory: str) -> str:
    """A run's event file as Dagster makes one (tables, WAL mode, stamped at the newest
    revision), kept in the event log's `directory` (one per Dagster version and revision; a
    dot file, which Dagster's `*.db` globs pass over) and shared by every process. Made per
    process in a temporary directory instead, it was left behind by every forked run ending
    in os._exit (120 KB in /tmp per run)."""
    name = f".empty-{dagster_version}-{_migrations().get_current_head()}.template"
    path = os.path.join(directory, name)
    if os.path.exists(path):
        return path
    part = f"{path}.{os.getpid()}.part"
    try:
        engine = db.create_engine(f"sqlite:///{part}", poolclass=NullPool)
        with engine.connect() as connection:
            SqlEventLogStorageMetadata.create_all(connection)
            connection.execute(db.text("PRAGMA journal_mode=WAL;"))
            MigrationContext.configure(connection).stamp(_migrations(), "head")
            connection.commit()
        engine.dispose()  # the last connection closed: everything is in the file itself
        rename_into_place(part, path)
    except FileExistsError:
        pass  # another process made it meanwhile: the same file
    finally:
        with suppress(OSError):
            os.unlink(part)
    return path


def _copy_of_empty(path: str) -> bool:
    """Put a copy of the empty event file at `path`, never over a file another process made
    there meanwhile; False if it was not put there."""
    part = f"{path}.{os.getpid()}.part"
    try:
        shutil.copyfile(_empty_event_file(os.path.dirname(path)), part)
        rename_into_place(part, path)
    except (OSError, db.exc.DatabaseError):
        return False
    finally:
        with suppress(OSError):
            os.unlink(part)
    return True


def _found_once(found: set[str], name: str, look: Callable[[str], bool]) -> bool:
    """Whether `look` finds `name` (a table, a column, an index), asked only until it does:
    Dagster's SQLite storages looked before nearly every call, and nothing they find goes
    away while the process lives (no migration drops one), so only an absence is asked again."""
    if name in found:
        return True
    if look(name):
        found.add(name)
        return True
    return False


_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()  # every engine kept, in this process


def _after_fork() -> None:
    """In a forked child: never use the parent's open SQLite connections."""
    for engine in list(_ENGINES):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork)


def _kept_engine(url: str, **connect_args: Any) -> Engine:
    """An engine whose connection stays open between uses (SQLAlchemy's default pool for a
    SQLite file, shared by the threads of this process). Threads that need one at the same
    time (the webserver's) get more, opened for them and closed after: never a wait."""
    engine = db.create_engine(url, pool_size=1, max_overflow=-1, connect_args=connect_args)
    db.event.listen(engine, "connect", _synchronous_normal)
    _ENGINES.add(engine)
    return engine


def _synchronous_normal(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    """Commits without an fsync each (in WAL mode, fsynced at each checkpoint).
    SQLite's default (FULL) fsynced every commit: each event of every run, each run-status
    change, each cursor: ~1000 of the ~1300 fsyncs of a 16-run drive of 4 packages (40 were
    the package data's), each a cache flush of the disk the drive's copies stream to.
    Still consistent after any crash; what an OS crash or a power cut may lose is the last
    commits before it, which only the runs of processes that died with it made: the
    instance is then a little behind OpsDB (synchronous=FULL, the record every deletion and
    every copy rests on), as a fresh or restored instance is, which the sensors catch up
    from OpsDB, and runs left in flight are closed as dead (the boot id in their
    `ccat/worker`). A process killed alone loses nothing (its commits are in the kernel's
    page cache)."""
    cursor = dbapi_connection.cursor()
    try:
        # Only in WAL mode (Dagster's files all are, from their creation on): with a rollback
        # journal, NORMAL could leave a corrupt file after a power cut
        if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
            cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


class SqliteRuns(SqliteRunStorage):
    """SqliteRunStorage with one kept engine, which records the Dagster daemon's process."""

    def __init__(self, conn_string: str, inst_data: ConfigurableClassData | None = None) -> None:
        self._run_stats_columns = False  # found in the runs table (has_run_stats_index_cols)
        self._backfill_column = False  # and this one (has_backfill_id_column)
        self._built_indexes: set[str] = set()  # data migrations found done (has_built_index)
        super().__init__(conn_string, inst_data)
        self._engine = _kept_engine(conn_string)
        self._daemons: set[str] = set()  # daemon ids whose process this one recorded

    # Dagster asks these before nearly every run lookup, run event or new run: two reflect the
    # runs table's columns (PRAGMA table_info: a quarter of a get_run_by_id, ~3 % of a drive's
    # CPU), one queries the migration table. What is found stays (no migration drops a column
    # or undoes a data migration; `wipe` deletes rows only), so only an absence is looked at
    # again, as SqliteEventLog.has_table does.

    def has_run_stats_index_cols(self) -> bool:
        if not self._run_stats_columns:
            self._run_stats_columns = super().has_run_stats_index_cols()
        return self._run_stats_columns

    def has_backfill_id_column(self) -> bool:  # reflected for every run created
        if not self._backfill_column:
            self._backfill_column = super().has_backfill_id_column()
        return self._backfill_column

    def has_built_index(self, migration_name: str) -> bool:
        return _found_once(self._built_indexes, migration_name, super().has_built_index)

    def add_daemon_heartbeat(self, daemon_heartbeat: DaemonHeartbeat) -> None:
        """The heartbeat, and first (once per daemon id in this process, the daemon's)
        which process writes it: a heartbeat outlives its daemon by DAEMON_FRESH_S, and a
        `ccat-dt drive` started meanwhile (`make ui` stopped or killed a moment ago) waited
        that long for a daemon that was gone. The drive reads the record
        (driver.daemon_gone); a failure to write it never keeps the heartbeat back."""
        daemon = daemon_heartbeat.daemon_id
        if daemon and daemon not in self._daemons:
            from ccat_assets.inflight import this_process  # Dagster's layer, loaded by then

            worker, identity = this_process()
            try:
                self.set_cursor_values({DAEMON_PROCESS_KEY: json.dumps({
                    "daemon_id": daemon, "worker": worker, "identity": identity})})
                self._daemons.add(daemon)
            except db.exc.SQLAlchemyError as exc:
                LOG.warning("the Dagster daemon's process not recorded: %s", exc)
        super().add_daemon_heartbeat(daemon_heartbeat)

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None,  # type: ignore[override]
                          config_value: Any) -> SqliteRuns:
        return cls.from_local(inst_data=inst_data, **config_value)

    @classmethod
    def from_local(cls, base_dir: str, inst_data: ConfigurableClassData | None = None
                   ) -> SqliteRuns:
        with _creating(base_dir):
            return super().from_local(base_dir, inst_data)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self._engine.connect() as connection, connection.begin():
            yield connection

    def has_execution_plan_snapshot(self, execution_plan_snapshot_id: str) -> bool:
        """Whether the snapshot is stored: Dagster's read, decompressed and deserialized the
        whole plan to learn it, for every run created (~12% of creating one)."""
        return self._has_snapshot_id(execution_plan_snapshot_id)

    def dispose(self) -> None:
        self._engine.dispose()
        super().dispose()


class SqliteEventLog(SqliteEventLogStorage):
    """SqliteEventLogStorage that keeps its engines and knows the schema's head revision."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._tables_found: set[str] = set()  # in the index (has_table)
        self._indexes_found: set[str] = set()  # data migrations done (has_secondary_index)
        self._asset_key_columns: set[str] = set()  # found in asset_keys (reflected per event)
        super().__init__(base_dir, inst_data)

    def _close_all(self) -> None:
        with self._db_lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines.clear()

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None,  # type: ignore[override]
                          config_value: Any) -> SqliteEventLog:
        return cls(inst_data=inst_data, **config_value)

    @contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        with self._db_lock:
            engine = self._engines.pop(shard, None)
            if engine is None:
                engine = _kept_engine(self.conn_string_for_shard(shard),
                                      timeout=SQLITE_BUSY_TIMEOUT_SECONDS)
                if shard not in self._initialized_dbs:
                    self._initdb(engine)
                    self._initialized_dbs.add(shard)
            self._engines[shard] = engine  # the most recently used last
            while len(self._engines) > KEPT_ENGINES:
                self._engines.popitem(last=False)[1].dispose()
            with engine.connect() as connection, connection.begin():
                yield connection

    def has_table(self, table_name: str) -> bool:
        """Dagster's opens a new engine on the index at each look (every dynamic partition
        looked up: ~5% of a forked run's CPU); a table found stays (no migration drops one),
        so only its absence is looked at again. Not through the kept engines: it is called
        while one of their connections is held (their lock)."""
        return _found_once(self._tables_found, table_name, super().has_table)

    def has_secondary_index(self, name: str) -> bool:
        """A query of the index per call (each asset event stored, each asset record read);
        one found done stays done until `wipe` (as Dagster's consolidated SQLite storage
        keeps them)."""
        return _found_once(self._indexes_found, name, super().has_secondary_index)

    def _has_asset_key_col_on_connection(self, conn: Connection, column_name: str) -> bool:
        """Dagster reflects the asset_keys table's columns for every event it stores (and
        every asset record read); a column found stays until `wipe`."""
        return _found_once(self._asset_key_columns, column_name,
                           partial(super()._has_asset_key_col_on_connection, conn))

    def _initdb(self, engine: Engine, for_index_shard: bool = False) -> None:
        """A new run's file is a copy of an empty one kept beside it; one at the
        newest revision is left as it is. Anything else (the index, an empty or older file,
        another process creating the same file, a copy that failed) goes Dagster's own way,
        with its retries."""
        if not for_index_shard:
            path = engine.url.database
            if path and not os.path.exists(path) and _copy_of_empty(path):
                return
            try:
                with engine.connect() as connection:
                    current = MigrationContext.configure(connection).get_current_revision()
                    if current == _migrations().get_current_head():
                        return
            except (db.exc.DatabaseError, sqlite3.DatabaseError):
                pass
        with _creating(self._base_dir):
            super()._initdb(engine, for_index_shard=for_index_shard)

    def wipe(self) -> None:
        self._close_all()  # before its files are deleted
        self._tables_found.clear()
        self._indexes_found.clear()
        self._asset_key_columns.clear()
        super().wipe()

    def dispose(self) -> None:
        self._close_all()
        super().dispose()


class SqliteSchedules(SqliteScheduleStorage):
    """Dagster's SQLite schedule storage (schedules.db: sensor and schedule states, ticks),
    made by one process at a time, with one kept engine: Dagster's made a new one per call
    (its statements compiled again, a connection opened and closed), ~4 per sensor-state
    lookup, several per drive tick."""

    def __init__(self, conn_string: str, inst_data: ConfigurableClassData | None = None) -> None:
        self._index_table = False  # secondary_indexes found (has_secondary_index_table)
        self._instigators_table = False  # and these tables (listed at every state read)
        self._evaluations_table = False
        self._built_indexes: set[str] = set()  # data migrations found done (has_built_index)
        super().__init__(conn_string, inst_data)
        self._engine = _kept_engine(conn_string)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self._engine.connect() as connection, connection.begin():
            yield connection

    # Every sensor state read (several per drive tick) listed the schema's tables (twice) and
    # asked whether a data migration was done (a query). What is found stays (wipe
    # deletes rows, never tables or these marks).

    def has_secondary_index_table(self) -> bool:
        if not self._index_table:
            self._index_table = super().has_secondary_index_table()
        return self._index_table

    def _has_instigators_table(self, conn: Connection) -> bool:
        if not self._instigators_table:
            self._instigators_table = super()._has_instigators_table(conn)
        return self._instigators_table

    def _has_asset_daemon_asset_evaluations_table(self, conn: Connection) -> bool:
        if not self._evaluations_table:
            self._evaluations_table = super()._has_asset_daemon_asset_evaluations_table(conn)
        return self._evaluations_table

    def has_built_index(self, migration_name: str) -> bool:
        return _found_once(self._built_indexes, migration_name, super().has_built_index)

    def dispose(self) -> None:
        self._engine.dispose()
        super().dispose()

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None,  # type: ignore[override]
                          config_value: Any) -> SqliteSchedules:
        return cls.from_local(inst_data=inst_data, **config_value)

    @classmethod
    def from_local(cls, base_dir: str, inst_data: ConfigurableClassData | None = None
                   ) -> SqliteSchedules:
        with _creating(base_dir):
            made = super().from_local(base_dir, inst_data)
        assert isinstance(made, SqliteSchedules)
        return made

import os

from alembic import context
from sqlalchemy import create_engine, event, pool, text

from ccat_dt.opsdb.database import (
    LOCK_TIMEOUT_ENV,
    link_connect_args,
    lock_timeout_s,
    server_link_settings,
    set_on_connect,
)
from ccat_dt.opsdb.models import Base

MIGRATION_LOCK = 0x63636174  # "ccat": the PostgreSQL advisory lock every `migrate` takes

target_metadata = Base.metadata
url = context.config.get_main_option("sqlalchemy.url")
assert url, "sqlalchemy.url must be set by ccat_dt.opsdb.database"

if context.is_offline_mode():
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    # A plain engine: on SQLite, foreign keys stay off while batch migrations copy tables
    # (the application's engine turns them on, which would make those copies fail).
    # On PostgreSQL: a server that never answers, or a network path gone silent under the
    # upgrade, is given up on as by the application's engine (connect_timeout, keepalives,
    # tcp_user_timeout, and the server's side of them: a cut upgrade's transaction, its
    # advisory lock and its table locks, ends with it, not 2 h later).
    sqlite = url.startswith("sqlite")
    engine = create_engine(url, poolclass=pool.NullPool, connect_args={
        "timeout": float(os.environ.get(LOCK_TIMEOUT_ENV) or 30)} if sqlite
        else link_connect_args(url))
    set_on_connect(engine, server_link_settings(url))
    if sqlite:
        # pysqlite would commit DDL as it goes; an explicit BEGIN (and transactional_ddl
        # below: one transaction for the whole upgrade, not one per revision) makes it
        # all-or-nothing, so a failed upgrade leaves the OpsDB at its previous revision.
        # IMMEDIATE takes the write lock before the revision is read and holds it to the
        # end: a second `migrate` at the same time waits, then finds the schema migrated (with
        # a lock per revision it took the lock between two of the first's revisions and both
        # ran the next one: "index ... already exists").
        @event.listens_for(engine, "connect")
        def _autocommit_driver(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(connection):  # type: ignore[no-untyped-def]
            connection.exec_driver_sql("BEGIN IMMEDIATE")
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=True, transactional_ddl=True)
        with context.begin_transaction():
            if engine.dialect.name == "postgresql":  # the same, for the whole transaction
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                   {"key": MIGRATION_LOCK})
                # A table another session holds (an `idle in transaction` psql, a run in the
                # middle of its transaction) is waited for lock_timeout_s(), then the upgrade
                # fails whole (database.MigrationBlocked). Unbounded, the ALTER waited for ever
                # and every other query on that table queued behind it: the system stood still.
                connection.execute(text(
                    f"SET LOCAL lock_timeout = {max(1, round(lock_timeout_s() * 1000))}"))
            context.run_migrations()
    engine.dispose()

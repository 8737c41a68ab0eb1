from alembic import context
from sqlalchemy import create_engine, event, pool

from ccat_dt.opsdb.models import Base

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
    engine = create_engine(url, poolclass=pool.NullPool)
    if engine.dialect.name == "sqlite":
        # pysqlite would commit DDL as it goes; an explicit BEGIN makes each migration
        # all-or-nothing, so a failed upgrade leaves the OpsDB at its previous revision.
        @event.listens_for(engine, "connect")
        def _autocommit_driver(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(connection):  # type: ignore[no-untyped-def]
            connection.exec_driver_sql("BEGIN")
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()

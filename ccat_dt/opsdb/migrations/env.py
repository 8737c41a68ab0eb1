from alembic import context

from ccat_dt.opsdb.database import create_opsdb_engine
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
    engine = create_opsdb_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()

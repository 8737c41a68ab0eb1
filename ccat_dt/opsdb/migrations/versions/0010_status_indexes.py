"""indexes `ccat-dt status` reads at scale

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 18:00:00.000000

With 10^7 copies: the bytes on disk per location are summed from an index over live copies
only (present or staged, a small part of all copies after years of purges), without reading
the table; the buffer forecast's arrivals and departures of the last hours are found by time.
"""

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

LIVE = sa.text("status IN ('present', 'staged')")


def upgrade() -> None:
    with op.batch_alter_table('physical_copies', schema=None) as batch_op:
        batch_op.create_index('ix_physical_copies_live', ['location_id', 'size'], unique=False,
                              sqlite_where=LIVE, postgresql_where=LIVE)
        batch_op.create_index('ix_physical_copies_created_at', ['created_at'], unique=False)
        batch_op.create_index('ix_physical_copies_deleted_at', ['deleted_at'], unique=False)
    with op.batch_alter_table('raw_data_files', schema=None) as batch_op:
        batch_op.create_index('ix_raw_data_files_filed_at', ['filed_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('raw_data_files', schema=None) as batch_op:
        batch_op.drop_index('ix_raw_data_files_filed_at')
    with op.batch_alter_table('physical_copies', schema=None) as batch_op:
        batch_op.drop_index('ix_physical_copies_deleted_at')
        batch_op.drop_index('ix_physical_copies_created_at')
        batch_op.drop_index('ix_physical_copies_live')

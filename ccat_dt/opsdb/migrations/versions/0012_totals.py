"""totals kept by triggers: rows and bytes per location and status, for `ccat-dt status`;
indexes for what it lists besides (corrupt copies, verified package copies by package, the
last hour's operations)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 20:00:00.000000

Filled from the rows already there; from then on every INSERT, UPDATE and DELETE of copies,
raw files, packages and operations changes them in its own transaction
(ccat_dt/opsdb/totals.py says why triggers).
"""

import sqlalchemy as sa
from alembic import op

from ccat_dt.opsdb import totals

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

CORRUPT = sa.text("status = 'corrupt'")
VERIFIED = sa.text("status = 'present' AND verified_at >= created_at AND package_id IS NOT NULL")


def upgrade() -> None:
    op.create_table('totals',
    sa.Column('subject', sa.String(length=16), nullable=False),
    sa.Column('location_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=64), nullable=False),
    sa.Column('slot', sa.Integer(), nullable=False),
    sa.Column('items', sa.BigInteger(), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('subject', 'location_id', 'status', 'slot')
    )
    with op.batch_alter_table('physical_copies', schema=None) as batch_op:
        batch_op.create_index('ix_physical_copies_corrupt', ['package_id'], unique=False,
                              sqlite_where=CORRUPT, postgresql_where=CORRUPT)
        batch_op.create_index('ix_physical_copies_verified', ['package_id', 'location_id'],
                              unique=False, sqlite_where=VERIFIED, postgresql_where=VERIFIED)
    with op.batch_alter_table('operations', schema=None) as batch_op:
        batch_op.create_index('ix_operations_finished_at', ['finished_at'], unique=False)
    totals.install(op.get_bind())  # last: a table SQLite rebuilt above would lose its triggers


def downgrade() -> None:
    with op.batch_alter_table('operations', schema=None) as batch_op:
        batch_op.drop_index('ix_operations_finished_at')
    with op.batch_alter_table('physical_copies', schema=None) as batch_op:
        batch_op.drop_index('ix_physical_copies_verified')
        batch_op.drop_index('ix_physical_copies_corrupt')
    totals.uninstall(op.get_bind())
    op.drop_table('totals')

"""totals kept by triggers: rows and bytes per location and status, for `ccat-dt status`

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


def upgrade() -> None:
    op.create_table('totals',
    sa.Column('subject', sa.String(length=16), nullable=False),
    sa.Column('location_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=64), nullable=False),
    sa.Column('items', sa.BigInteger(), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('subject', 'location_id', 'status')
    )
    totals.install(op.get_bind())


def downgrade() -> None:
    totals.uninstall(op.get_bind())
    op.drop_table('totals')

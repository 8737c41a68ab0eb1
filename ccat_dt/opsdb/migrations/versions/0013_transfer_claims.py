"""a transfer or archive operation in flight is a claim on its (package, destination): the
process that holds it (host, pid) and until when its lease runs (ccat_dt/claims.py)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 23:30:00

Columns added in place (ALTER TABLE ADD COLUMN, no table copy), so the totals triggers on
operations stay. Operations in flight from before have no lease: no process holds them.
"""

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

COLUMNS = ('owner_host', 'owner_pid', 'lease_until')


def upgrade() -> None:
    op.add_column('operations', sa.Column('owner_host', sa.String(length=200), nullable=True))
    op.add_column('operations', sa.Column('owner_pid', sa.Integer(), nullable=True))
    op.add_column('operations', sa.Column('lease_until', sa.DateTime(timezone=True),
                                          nullable=True))


def downgrade() -> None:
    for column in reversed(COLUMNS):  # in place too (SQLite >= 3.35)
        op.drop_column('operations', column)

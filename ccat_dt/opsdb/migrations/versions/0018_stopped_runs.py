"""re-attempts: the newest runs in a row stopped with no person's doing (a drive under
`timeout`, a nightly shutdown), since when, and when a person was told

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07 07:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:  # in place (no table copy)
    op.add_column('reattempts', sa.Column('stopped_runs', sa.Integer(),
                                          server_default=sa.text('0'), nullable=False))
    op.add_column('reattempts', sa.Column('stopped_since', sa.DateTime(timezone=True),
                                          nullable=True))
    op.add_column('reattempts', sa.Column('stopped_told_at', sa.DateTime(timezone=True),
                                          nullable=True))


def downgrade() -> None:
    op.drop_column('reattempts', 'stopped_told_at')  # in place (SQLite >= 3.35)
    op.drop_column('reattempts', 'stopped_since')
    op.drop_column('reattempts', 'stopped_runs')

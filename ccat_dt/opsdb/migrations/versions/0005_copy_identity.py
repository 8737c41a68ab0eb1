"""copy identity: inode and mtime recorded when a copy is filed

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 15:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('physical_copies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('inode', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('mtime_ns', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('physical_copies', schema=None) as batch_op:
        batch_op.drop_column('mtime_ns')
        batch_op.drop_column('inode')

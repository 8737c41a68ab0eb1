"""index copies by location and status

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 02:04:30.363816
"""

from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('physical_copies', schema=None) as batch_op:
        batch_op.create_index('ix_physical_copies_location_status', ['location_id', 'status'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('physical_copies', schema=None) as batch_op:
        batch_op.drop_index('ix_physical_copies_location_status')


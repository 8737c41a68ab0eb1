"""location health, primary-site failover note, raw files taken out of their package

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-10 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('data_locations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('failing_since', sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column('unhealthy_until', sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column('unhealthy_reason', sa.Text(), nullable=True))
    with op.batch_alter_table('raw_data_packages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('primary_site_note', sa.Text(), nullable=True))
    with op.batch_alter_table('raw_data_files', schema=None) as batch_op:
        batch_op.add_column(sa.Column('excluded_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('excluded_by', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('excluded_reason', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('excluded_from', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('raw_data_files', schema=None) as batch_op:
        for column in ('excluded_from', 'excluded_reason', 'excluded_by', 'excluded_at'):
            batch_op.drop_column(column)
    with op.batch_alter_table('raw_data_packages', schema=None) as batch_op:
        batch_op.drop_column('primary_site_note')
    with op.batch_alter_table('data_locations', schema=None) as batch_op:
        for column in ('unhealthy_reason', 'unhealthy_until', 'failing_since'):
            batch_op.drop_column(column)

"""staging requests

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 00:45:23.773542
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('staging_requests',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('uuid', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('location_id', sa.Integer(), nullable=False),
    sa.Column('state', sa.Enum('active', 'released', 'failed', name='stagingstate', native_enum=False, length=32), nullable=False),
    sa.Column('selection', sa.JSON(), nullable=False),
    sa.Column('requested_by', sa.String(length=100), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('released_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('staged_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['location_id'], ['data_locations.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name'),
    sa.UniqueConstraint('uuid')
    )
    op.create_table('staging_request_packages',
    sa.Column('staging_request_id', sa.Integer(), nullable=False),
    sa.Column('package_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['package_id'], ['raw_data_packages.id'], ),
    sa.ForeignKeyConstraint(['staging_request_id'], ['staging_requests.id'], ),
    sa.PrimaryKeyConstraint('staging_request_id', 'package_id')
    )
    with op.batch_alter_table('physical_copies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('staging_request_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_physical_copies_staging_request_id'), ['staging_request_id'], unique=False)
        batch_op.create_foreign_key('fk_physical_copies_staging_request_id', 'staging_requests', ['staging_request_id'], ['id'])



def downgrade() -> None:
    with op.batch_alter_table('physical_copies', schema=None) as batch_op:
        batch_op.drop_constraint('fk_physical_copies_staging_request_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_physical_copies_staging_request_id'))
        batch_op.drop_column('staging_request_id')

    op.drop_table('staging_request_packages')
    op.drop_table('staging_requests')

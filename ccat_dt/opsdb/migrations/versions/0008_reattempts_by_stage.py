"""re-attempts keyed by the domain's stage, not a Dagster job name

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 17:45:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

JOB_STAGE = {'package_job': 'packaging', 'site_copy_job': 'site_copy',
             'lta_copy_job': 'lta_copy', 'purge_job': 'purge', 'staging_job': 'staging'}


def _rename(column: str, new: str, mapping: dict[str, str]) -> None:
    with op.batch_alter_table('reattempts', schema=None) as batch_op:
        batch_op.alter_column(column, new_column_name=new, existing_type=sa.String(64),
                              existing_nullable=False)
    table = sa.table('reattempts', sa.column(new, sa.String))
    for old, value in mapping.items():
        op.execute(table.update().where(table.c[new] == old).values({new: value}))


def upgrade() -> None:
    _rename('job', 'stage', JOB_STAGE)


def downgrade() -> None:
    _rename('stage', 'job', {v: k for k, v in JOB_STAGE.items()})

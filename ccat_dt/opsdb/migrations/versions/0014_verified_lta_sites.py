"""per package, the number of sites holding a verified LTA copy, kept by triggers, and an
index on it: the service level reads the unsafe packages instead of every package; an index
of the LOST packages, which `status` lists first

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 01:00:00

Column and index added in place (no table copy), so the totals triggers stay; the count is
filled from the copies already there (ccat_dt/opsdb/archived_sites.py says how it is kept).
"""

import sqlalchemy as sa
from alembic import op

from ccat_dt.opsdb import archived_sites

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None

LOST = sa.text("state = 'lost'")


def upgrade() -> None:
    op.add_column('raw_data_packages', sa.Column('verified_lta_sites', sa.Integer(),
                                                 server_default=sa.text('0'), nullable=False))
    op.create_index('ix_raw_data_packages_verified_lta_sites', 'raw_data_packages',
                    ['verified_lta_sites', 'created_at'], unique=False)
    op.create_index('ix_raw_data_packages_lost', 'raw_data_packages', ['id'], unique=False,
                    sqlite_where=LOST, postgresql_where=LOST)
    archived_sites.install(op.get_bind())


def downgrade() -> None:
    archived_sites.uninstall(op.get_bind())
    op.drop_index('ix_raw_data_packages_lost', table_name='raw_data_packages')
    op.drop_index('ix_raw_data_packages_verified_lta_sites', table_name='raw_data_packages')
    op.drop_column('raw_data_packages', 'verified_lta_sites')  # in place (SQLite >= 3.35)

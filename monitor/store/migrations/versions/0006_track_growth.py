"""Each track's area in its last layer and how many layers in a row it grew, for the
growth rule of [alarms.tracks] (a swelling building up alarms before its volume is large).

Tracks stored before this revision start with neither: a live one may alarm by growth
from its next layers on.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tracks') as batch:
        batch.add_column(sa.Column('area_mm2', sa.Float(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('growing', sa.Integer(), nullable=False,
                                   server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('tracks') as batch:
        batch.drop_column('growing')
        batch.drop_column('area_mm2')

"""Builds an operator marked good: the healthy layers `pbf-monitor adapt` learns a printer
from.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('builds', schema=None) as batch_op:
        batch_op.add_column(sa.Column('marked_good_at', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('marked_good_note', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('builds', schema=None) as batch_op:
        for c in ('marked_good_note', 'marked_good_at'):
            batch_op.drop_column(c)

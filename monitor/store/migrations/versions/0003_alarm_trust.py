"""Alarms an operator keeps switched on: relative rules' baselines, trust, verdicts, units,
positions and links.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('rule_states', schema=None) as batch_op:
        batch_op.add_column(sa.Column('history', sa.Text(), nullable=False,
                                      server_default='[]'))
    with op.batch_alter_table('alarms', schema=None) as batch_op:
        batch_op.add_column(sa.Column('model_trusted', sa.Boolean(), nullable=False,
                                      server_default=sa.true()))
        batch_op.add_column(sa.Column('unit', sa.String(length=20), nullable=False,
                                      server_default=''))
        batch_op.add_column(sa.Column('position_x_mm', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('position_y_mm', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('url', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('verdict', sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column('verdict_note', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('verdict_at', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('alarms', schema=None) as batch_op:
        for c in ('verdict_at', 'verdict_note', 'verdict', 'url', 'position_y_mm',
                  'position_x_mm', 'unit', 'model_trusted'):
            batch_op.drop_column(c)
    with op.batch_alter_table('rule_states', schema=None) as batch_op:
        batch_op.drop_column('history')

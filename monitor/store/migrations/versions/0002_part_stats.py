"""Per-part statistics against the nominal slices, and the part of a part alarm.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('part_stats',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('layer_id', sa.Integer(), nullable=False),
    sa.Column('part', sa.Integer(), nullable=False),
    sa.Column('nominal_mm2', sa.Float(), nullable=False),
    sa.Column('printed_fraction', sa.Float(), nullable=False),
    sa.Column('excess_fraction', sa.Float(), nullable=False),
    sa.Column('centroid_shift_mm', sa.Float(), nullable=True),
    sa.Column('classes', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['layer_id'], ['layers.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('part_stats', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_part_stats_layer_id'), ['layer_id'], unique=False)
    with op.batch_alter_table('alarms', schema=None) as batch_op:
        batch_op.add_column(sa.Column('part', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('alarms', schema=None) as batch_op:
        batch_op.drop_column('part')
    with op.batch_alter_table('part_stats', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_part_stats_layer_id'))
    op.drop_table('part_stats')

"""Each sink's delivery cursor (MQTT, OPC UA) and the outbox messages that are the present
(each printer's last layer, each alarm not yet cleared), kept when the outbox is pruned.

The present is filled from the outbox as it stands: an alarm whose last message was pruned
before this revision shows up again with its next transition.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('outbox_present',
    sa.Column('key', sa.String(length=250), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('sink_cursors',
    sa.Column('name', sa.String(length=50), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    # The present as the outbox tells it, oldest message first (as records.present_key,
    # copied here so that this revision does the same whatever that function becomes).
    outbox = sa.table('outbox', sa.column('seq', sa.Integer()), sa.column('topic', sa.String()),
                      sa.column('payload', sa.Text()))
    conn = op.get_bind()
    present: dict[str, int | None] = {}
    rows = conn.execute(sa.select(outbox.c.seq, outbox.c.topic, outbox.c.payload)
                        .where(outbox.c.topic.in_(("layer", "alarm"))).order_by(outbox.c.seq))
    for seq, topic, text in rows:
        p = json.loads(text)
        if topic == "layer":
            present[f"layer/{p.get('printer') or ''}"] = seq
        elif not p.get("test"):
            present[f"alarm/{p.get('id')}"] = None if p.get("state") == "cleared" else seq
    kept = [{"key": k, "seq": v} for k, v in present.items() if v is not None]
    if kept:
        op.bulk_insert(sa.table('outbox_present', sa.column('key', sa.String()),
                                sa.column('seq', sa.Integer())), kept)


def downgrade() -> None:
    op.drop_table('sink_cursors')
    op.drop_table('outbox_present')

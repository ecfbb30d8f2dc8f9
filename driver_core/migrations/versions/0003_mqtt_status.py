"""MQTT downlink status: which downlink state changes the broker has acknowledged.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "downlink_events",
        sa.Column("mqtt_sent", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    # History from before the status topic existed is not replayed onto it after an upgrade.
    op.execute(sa.text("UPDATE downlink_events SET mqtt_sent = :sent").bindparams(sent=True))
    op.create_index("ix_downlink_events_mqtt_sent", "downlink_events", ["mqtt_sent"])


def downgrade() -> None:
    op.drop_index("ix_downlink_events_mqtt_sent", table_name="downlink_events")
    with op.batch_alter_table("downlink_events") as batch:
        batch.drop_column("mqtt_sent")

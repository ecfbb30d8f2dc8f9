"""Initial schema: devices, security contexts, uplinks, MQTT outbox, integration settings.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the column types: a migration must not change when models.py does.
_UTC = sa.DateTime(timezone=True)
_ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("serial", sa.String(length=16), nullable=False),
        sa.Column("hw_type", sa.Integer(), nullable=False),
        sa.Column("kid", sa.LargeBinary(length=7), nullable=False),
        sa.Column("master_secret_enc", sa.LargeBinary(), nullable=False),
        sa.Column("master_salt_enc", sa.LargeBinary(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=True),
        sa.Column("created_at", _UTC, nullable=False),
        sa.Column("join_date", _UTC, nullable=True),
        sa.Column("last_seen", _UTC, nullable=True),
        sa.Column("firmware", sa.String(length=64), nullable=True),
        sa.Column("tx_interval", sa.Integer(), nullable=False),
        sa.Column("uplinks_since_join", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
        sa.UniqueConstraint("serial", name="uq_devices_serial"),
        sa.UniqueConstraint("kid", name="uq_devices_kid"),
    )
    op.create_table(
        "security_contexts",
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("id_context", sa.LargeBinary(length=32), nullable=False),
        sa.Column("r2_issued_ms", sa.BigInteger(), nullable=False),
        sa.Column("sender_seq_reserved", sa.BigInteger(), nullable=False),
        sa.Column("replay_index", sa.BigInteger(), nullable=False),
        sa.Column("replay_bitfield", sa.BigInteger(), nullable=False),
        sa.Column("established_at", _UTC, nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE", name="fk_security_contexts_device_id_devices"),
        sa.PrimaryKeyConstraint("device_id", name="pk_security_contexts"),
    )
    op.create_table(
        "uplinks",
        sa.Column("id", _ROW_ID, nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("received_at", _UTC, nullable=False),
        sa.Column("message_type", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE", name="fk_uplinks_device_id_devices"),
        sa.PrimaryKeyConstraint("id", name="pk_uplinks"),
    )
    op.create_index("ix_uplinks_device_id", "uplinks", ["device_id"])
    op.create_index("ix_uplinks_received_at", "uplinks", ["received_at"])
    op.create_table(
        "mqtt_outbox",
        sa.Column("id", _ROW_ID, nullable=False),
        sa.Column("serial", sa.String(length=16), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("created_at", _UTC, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_mqtt_outbox"),
        # Ids must never be reused, even when the table empties: the publisher orders by them.
        sqlite_autoincrement=True,
    )
    op.create_table(
        "integration_settings",
        sa.Column("domain", sa.String(length=64), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("updated_at", _UTC, nullable=False),
        sa.PrimaryKeyConstraint("domain", name="pk_integration_settings"),
    )


def downgrade() -> None:
    op.drop_table("integration_settings")
    op.drop_table("mqtt_outbox")
    op.drop_index("ix_uplinks_received_at", table_name="uplinks")
    op.drop_index("ix_uplinks_device_id", table_name="uplinks")
    op.drop_table("uplinks")
    op.drop_table("security_contexts")
    op.drop_table("devices")

"""Downlink queue, its state-change events (callback delivery), API tokens.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_UTC = sa.DateTime(timezone=True)
_ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "downlinks",
        sa.Column("id", _ROW_ID, nullable=False),
        sa.Column("command_id", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("command", sa.String(length=64), nullable=False),
        sa.Column("code", sa.Integer(), nullable=False),
        sa.Column("parameter", sa.JSON(), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("callback_url", sa.String(length=2048), nullable=True),
        sa.Column("result", sa.Integer(), nullable=True),
        sa.Column("inserted_at", _UTC, nullable=False),
        sa.Column("dispatched_at", _UTC, nullable=True),
        sa.Column("acknowledged_at", _UTC, nullable=True),
        sa.Column("canceled_at", _UTC, nullable=True),
        sa.Column("unacknowledged_at", _UTC, nullable=True),
        sa.Column("updated_at", _UTC, nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], ondelete="CASCADE", name="fk_downlinks_device_id_devices"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_downlinks"),
        sa.UniqueConstraint("command_id", name="uq_downlinks_command_id"),
        # The wire id derives from the row id: never reuse one after a purge.
        sqlite_autoincrement=True,
    )
    op.create_index("ix_downlinks_state", "downlinks", ["state"])
    op.create_index("ix_downlinks_updated_at", "downlinks", ["updated_at"])
    op.create_index("ix_downlinks_device_id_state", "downlinks", ["device_id", "state"])
    op.create_table(
        "downlink_events",
        sa.Column("id", _ROW_ID, nullable=False),
        sa.Column("downlink_id", _ROW_ID, nullable=False),
        sa.Column("command_id", sa.String(length=128), nullable=False),
        sa.Column("serial", sa.String(length=16), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("at", _UTC, nullable=False),
        sa.Column("callback_url", sa.String(length=2048), nullable=True),
        sa.Column("callback_status", sa.String(length=16), nullable=True),
        sa.Column("callback_attempts", sa.Integer(), nullable=False),
        sa.Column("callback_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["downlink_id"], ["downlinks.id"], ondelete="CASCADE",
            name="fk_downlink_events_downlink_id_downlinks",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_downlink_events"),
    )
    op.create_index("ix_downlink_events_downlink_id", "downlink_events", ["downlink_id"])
    op.create_index("ix_downlink_events_callback_status", "downlink_events", ["callback_status"])
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", _UTC, nullable=False),
        sa.Column("last_used_at", _UTC, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("name", name="uq_api_tokens_name"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )


def downgrade() -> None:
    op.drop_table("api_tokens")
    op.drop_index("ix_downlink_events_callback_status", table_name="downlink_events")
    op.drop_index("ix_downlink_events_downlink_id", table_name="downlink_events")
    op.drop_table("downlink_events")
    op.drop_index("ix_downlinks_device_id_state", table_name="downlinks")
    op.drop_index("ix_downlinks_updated_at", table_name="downlinks")
    op.drop_index("ix_downlinks_state", table_name="downlinks")
    op.drop_table("downlinks")

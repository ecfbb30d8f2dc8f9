"""Web panel users; indexes for sorting the device list page by page.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_DEVICE_INDEXES = ("hw_type", "name", "join_date", "last_seen")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("username", name="uq_users_username"),
    )
    for column in _DEVICE_INDEXES:
        op.create_index(f"ix_devices_{column}", "devices", [column])


def downgrade() -> None:
    for column in _DEVICE_INDEXES:
        op.drop_index(f"ix_devices_{column}", table_name="devices")
    op.drop_table("users")

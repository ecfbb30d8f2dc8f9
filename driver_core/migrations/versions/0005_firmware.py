"""Firmware over the air: image library, targets, per-device update tracking.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "firmware_images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hw_type", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("release_notes", sa.Text(), nullable=True),
        sa.Column("uploaded_at", _UTC, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_firmware_images"),
        sa.UniqueConstraint("hw_type", "version", name="uq_firmware_images_hw_type_version"),
    )
    op.create_index("ix_firmware_images_sha256", "firmware_images", ["sha256"])
    op.create_table(
        "firmware_targets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("hw_type", sa.Integer(), nullable=True),
        sa.Column("device_id", sa.Integer(), nullable=True),
        sa.Column("created_at", _UTC, nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["firmware_images.id"], ondelete="CASCADE",
            name="fk_firmware_targets_image_id_firmware_images",
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], ondelete="CASCADE",
            name="fk_firmware_targets_device_id_devices",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_firmware_targets"),
        sa.UniqueConstraint("hw_type", name="uq_firmware_targets_hw_type"),
        sa.UniqueConstraint("device_id", name="uq_firmware_targets_device_id"),
    )
    op.create_index("ix_firmware_targets_image_id", "firmware_targets", ["image_id"])
    op.create_table(
        "firmware_updates",
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("from_version", sa.String(length=64), nullable=True),
        sa.Column("block_size", sa.Integer(), nullable=True),
        sa.Column("blocks", sa.Integer(), nullable=False),
        sa.Column("received_bytes", sa.BigInteger(), nullable=False),
        sa.Column("percent", sa.Integer(), nullable=False),
        sa.Column("ranges", sa.JSON(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("offered_at", _UTC, nullable=True),
        sa.Column("started_at", _UTC, nullable=True),
        sa.Column("last_block_at", _UTC, nullable=True),
        sa.Column("finished_at", _UTC, nullable=True),
        sa.Column("updated_at", _UTC, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], ondelete="CASCADE",
            name="fk_firmware_updates_device_id_devices",
        ),
        sa.ForeignKeyConstraint(
            ["image_id"], ["firmware_images.id"], ondelete="SET NULL",
            name="fk_firmware_updates_image_id_firmware_images",
        ),
        sa.PrimaryKeyConstraint("device_id", name="pk_firmware_updates"),
    )
    op.create_index("ix_firmware_updates_image_id", "firmware_updates", ["image_id"])
    op.create_index("ix_firmware_updates_state", "firmware_updates", ["state"])


def downgrade() -> None:
    op.drop_table("firmware_updates")
    op.drop_table("firmware_targets")
    op.drop_table("firmware_images")

"""Several driver instances on one database: instance registry and outbox ownership.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("started_at", _UTC, nullable=False),
        sa.Column("heartbeat_at", _UTC, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("mqtt_outbox") as batch:
        batch.add_column(sa.Column("instance_id", sa.Integer(), nullable=True))
        batch.create_index("ix_mqtt_outbox_instance_id", ["instance_id"])


def downgrade() -> None:
    with op.batch_alter_table("mqtt_outbox") as batch:
        batch.drop_index("ix_mqtt_outbox_instance_id")
        batch.drop_column("instance_id")
    op.drop_table("instances")

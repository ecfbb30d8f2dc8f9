"""Cluster mode: each device's last answered request and its protected answer.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("security_contexts") as batch:
        batch.add_column(sa.Column("answered_seqno", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("answered_request", sa.LargeBinary(length=32), nullable=True))
        batch.add_column(sa.Column("answer", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("security_contexts") as batch:
        batch.drop_column("answer")
        batch.drop_column("answered_request")
        batch.drop_column("answered_seqno")

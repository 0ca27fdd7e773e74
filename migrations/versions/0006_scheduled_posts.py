"""Scheduled posts (the daily digest, drift alerts): one row per job and schedule slot, so replicas sharing
the database post each one once.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

Frozen copy of the schema: it does not import the models.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "scheduled_posts",
        sa.Column("job", sa.String(length=64), nullable=False),
        sa.Column("slot", TIMESTAMP, nullable=False),
        sa.Column("claimed_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("job", "slot", name=op.f("pk_scheduled_posts")),
    )


def downgrade() -> None:
    op.drop_table("scheduled_posts")

"""The life of a message: when its author last edited it, and when they deleted it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Labels given before ``edited_at`` were given to an earlier text: kept and shown, not trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("edited_at", TIMESTAMP, nullable=True))
        batch.add_column(sa.Column("deleted_at", TIMESTAMP, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("edited_at")

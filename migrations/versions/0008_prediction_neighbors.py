"""Why this label: ``predictions.neighbors``, the training messages most like the predicted one.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

A JSON list per prediction: {"label", "similarity"} and a Slack message's id (its text is looked up when
a card or the Fix labels modal shows it, so `triage data forget` and retention need nothing here) or the
text of a row of the operator's dataset. NULL for predictions made before this step.

Frozen copy of the schema: it does not import the models.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("neighbors", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("neighbors")

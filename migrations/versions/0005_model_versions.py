"""Drop model_versions: the registry (each version's version.json and the ACTIVE pointer) is the one record
of model versions; the table was a mirror that nothing read and that activations left stale.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

Frozen copy of the schema: it does not import the models.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
STATUSES = ("active", "candidate", "rejected", "retired")


def upgrade() -> None:
    op.drop_table("model_versions")  # its index goes with it


def downgrade() -> None:
    # The table as 0001 made it, empty: the registry still holds every version.
    status = sa.Enum(*STATUSES, name="model_status", native_enum=False, create_constraint=True, length=16)
    op.create_table(
        "model_versions",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("base_model", sa.String(length=256), nullable=True),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("status", status, nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("promoted_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("name", name=op.f("uq_model_versions_name")),
    )
    op.create_index(
        "uq_model_versions_one_active",
        "model_versions",
        ["status"],
        unique=True,
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    )

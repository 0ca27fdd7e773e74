"""Cards and incidents: each triaged message's card in the card channel, its claim and its escalation;
bursts of urgent messages of one topic.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Frozen copy of the schema: it does not import the models, so later model changes cannot alter it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)
SLACK_ID = sa.String(length=32)
SLACK_TS = sa.String(length=32)


def upgrade() -> None:
    op.create_table(
        "cards",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("message_id", BIG_ID, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("channel_id", SLACK_ID, nullable=True),
        sa.Column("ts", SLACK_TS, nullable=True),
        sa.Column("due_at", TIMESTAMP, nullable=True),
        sa.Column("urgent", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_by", SLACK_ID, nullable=True),
        sa.Column("claimed_at", TIMESTAMP, nullable=True),
        sa.Column("not_request_by", SLACK_ID, nullable=True),
        sa.Column(
            "escalation_state",
            sa.Enum(
                "escalated",
                "acknowledged",
                "deescalated",
                name="escalation_state",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=True,
        ),
        sa.Column("escalation_channel_id", SLACK_ID, nullable=True),
        sa.Column("escalation_ts", SLACK_TS, nullable=True),
        sa.Column("escalated_by", SLACK_ID, nullable=True),
        sa.Column("escalated_at", TIMESTAMP, nullable=True),
        sa.Column("escalation_topic", sa.String(length=128), nullable=True),
        sa.Column("acknowledged_by", SLACK_ID, nullable=True),
        sa.Column("deescalated_by", SLACK_ID, nullable=True),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_cards_message_id_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cards")),
        sa.UniqueConstraint("message_id", name=op.f("uq_cards_message_id")),
    )
    op.create_index("ix_cards_due", "cards", ["due_at", "urgent"])
    op.create_index("ix_cards_posted", "cards", ["channel_id", "ts"])
    op.create_index("ix_cards_escalations", "cards", ["escalation_topic", "escalated_at"])
    op.create_table(
        "incidents",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("topic", sa.String(length=128), nullable=False),
        sa.Column("channel_id", SLACK_ID, nullable=True),
        sa.Column("ts", SLACK_TS, nullable=True),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("last_escalation_at", TIMESTAMP, nullable=False),
        sa.Column("escalations", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_incidents")),
    )
    op.create_index("ix_incidents_recent", "incidents", ["topic", "last_escalation_at"])


def downgrade() -> None:
    op.drop_index("ix_incidents_recent", table_name="incidents")
    op.drop_table("incidents")
    op.drop_index("ix_cards_escalations", table_name="cards")
    op.drop_index("ix_cards_posted", table_name="cards")
    op.drop_index("ix_cards_due", table_name="cards")
    op.drop_table("cards")

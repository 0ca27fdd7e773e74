"""Initial schema: messages, events, predictions, corrections, forgotten users, models, runs, audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Frozen copy of the schema: it does not import the models, so later model changes cannot alter it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
SLACK_ID = sa.String(length=32)
SLACK_TS = sa.String(length=32)


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("team_id", SLACK_ID, nullable=False),
        sa.Column("channel_id", SLACK_ID, nullable=False),
        sa.Column("ts", SLACK_TS, nullable=False),
        sa.Column("thread_ts", SLACK_TS, nullable=True),
        sa.Column("user_id", SLACK_ID, nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("text_removed_at", TIMESTAMP, nullable=True),
        sa.Column("received_at", TIMESTAMP, nullable=False),
        sa.Column("reply_channel_id", SLACK_ID, nullable=True),
        sa.Column("reply_ts", SLACK_TS, nullable=True),
        sa.Column("state", _enum("message_state", "pending", "classified", "skipped"), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TIMESTAMP, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("classified_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sa.UniqueConstraint("team_id", "channel_id", "ts", name=op.f("uq_messages_team_id_channel_id_ts")),
    )
    op.create_index("ix_messages_due", "messages", ["state", "next_attempt_at"])
    op.create_index(op.f("ix_messages_received_at"), "messages", ["received_at"])
    op.create_index("ix_messages_reply", "messages", ["team_id", "reply_channel_id", "reply_ts"], unique=True)
    op.create_index(op.f("ix_messages_user_id"), "messages", ["user_id"])

    op.create_table(
        "slack_events",
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("received_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_slack_events")),
    )
    op.create_index(op.f("ix_slack_events_received_at"), "slack_events", ["received_at"])

    op.create_table(
        "predictions",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("message_id", BIG_ID, nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_predictions_message_id_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
    )
    op.create_index("ix_predictions_message", "predictions", ["message_id", "created_at"])
    op.create_index(op.f("ix_predictions_model_version"), "predictions", ["model_version"])

    op.create_table(
        "prediction_heads",
        sa.Column("prediction_id", BIG_ID, nullable=False),
        sa.Column("head", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=128), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("scores", JSON, nullable=False),
        sa.ForeignKeyConstraint(
            ["prediction_id"],
            ["predictions.id"],
            name=op.f("fk_prediction_heads_prediction_id_predictions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("prediction_id", "head", name=op.f("pk_prediction_heads")),
    )

    op.create_table(
        "corrections",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("message_id", BIG_ID, nullable=False),
        sa.Column("head", sa.String(length=64), nullable=False),
        sa.Column("kind", _enum("correction_kind", "correction", "confirmation"), nullable=False),
        sa.Column("old_label", sa.String(length=128), nullable=True),
        sa.Column("new_label", sa.String(length=128), nullable=False),
        sa.Column("user_id", SLACK_ID, nullable=False),
        sa.Column("source", _enum("correction_source", "reaction", "button", "command"), nullable=False),
        sa.Column("reaction", sa.String(length=64), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("retracted_at", TIMESTAMP, nullable=True),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_corrections_message_id_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_corrections")),
    )
    op.create_index(op.f("ix_corrections_created_at"), "corrections", ["created_at"])
    op.create_index("ix_corrections_label", "corrections", ["message_id", "head", "created_at"])
    op.create_index("ix_corrections_reaction", "corrections", ["message_id", "user_id", "reaction"])

    op.create_table(
        "forgotten_users",
        sa.Column("user_id", SLACK_ID, nullable=False),
        sa.Column("forgotten_at", TIMESTAMP, nullable=False),
        sa.Column("requested_by", SLACK_ID, nullable=True),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_forgotten_users")),
    )

    op.create_table(
        "model_versions",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("base_model", sa.String(length=256), nullable=True),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column(
            "status", _enum("model_status", "active", "candidate", "rejected", "retired"), nullable=False
        ),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("promoted_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("name", name=op.f("uq_model_versions_name")),
    )
    # At most one active version.
    op.create_index(
        "uq_model_versions_one_active",
        "model_versions",
        ["status"],
        unique=True,
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    )

    op.create_table(
        "training_runs",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("trigger", _enum("training_trigger", "schedule", "command", "cli"), nullable=False),
        sa.Column("requested_by", SLACK_ID, nullable=True),
        sa.Column(
            "status", _enum("training_status", "running", "promoted", "rejected", "failed"), nullable=False
        ),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("train_examples", sa.Integer(), nullable=True),
        sa.Column("eval_examples", sa.Integer(), nullable=True),
        sa.Column("candidate_metrics", JSON, nullable=True),
        sa.Column("incumbent_metrics", JSON, nullable=True),
        sa.Column("candidate_version", sa.String(length=128), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_runs")),
    )
    op.create_index(op.f("ix_training_runs_started_at"), "training_runs", ["started_at"])

    op.create_table(
        "audit_log",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("user_id", SLACK_ID, nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("args", JSON, nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_created_at"), "audit_log", ["created_at"])
    op.create_index(op.f("ix_audit_log_user_id"), "audit_log", ["user_id"])


def downgrade() -> None:
    # Children before parents; dropping a table drops its indexes.
    for table in (
        "audit_log",
        "training_runs",
        "model_versions",
        "forgotten_users",
        "corrections",
        "prediction_heads",
        "predictions",
        "slack_events",
        "messages",
    ):
        op.drop_table(table)

"""Training runs as a queue for `triage worker`: a 'queued' status, the run's options, progress events.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Frozen copy of the schema: it does not import the models.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
OLD_STATUSES = ("running", "promoted", "rejected", "failed")
NEW_STATUSES = ("queued", *OLD_STATUSES)


NAMING = {"ck": "ck_%(table_name)s_%(constraint_name)s", "pk": "pk_%(table_name)s"}


def _status(*values: str) -> sa.Enum:
    return sa.Enum(*values, name="training_status", native_enum=False, create_constraint=True, length=16)


def _training_runs(statuses: tuple[str, ...], *, queue_columns: bool) -> sa.Table:
    """The table as it stands before this step: SQLite's batch mode copies it without reflecting it (so
    ``alembic upgrade --sql`` works there too)."""
    columns = [
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column(
            "trigger",
            sa.Enum(
                "schedule",
                "command",
                "cli",
                name="training_trigger",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("requested_by", sa.String(length=32), nullable=True),
        sa.Column("status", _status(*statuses), nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("train_examples", sa.Integer(), nullable=True),
        sa.Column("eval_examples", sa.Integer(), nullable=True),
        sa.Column("candidate_metrics", JSON, nullable=True),
        sa.Column("incumbent_metrics", JSON, nullable=True),
        sa.Column("candidate_version", sa.String(length=128), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    ]
    if queue_columns:
        columns += [
            sa.Column("queued_at", TIMESTAMP, nullable=True),
            sa.Column("options", JSON, nullable=True),
            sa.Column("notify_channel", sa.String(length=32), nullable=True),
            sa.Column("worker", sa.String(length=128), nullable=True),
        ]
    table = sa.Table(
        "training_runs",
        sa.MetaData(naming_convention=NAMING),
        *columns,
        sa.PrimaryKeyConstraint("id"),
    )
    sa.Index("ix_training_runs_started_at", table.c.started_at)
    if queue_columns:
        sa.Index("ix_training_runs_queue", table.c.status, table.c.queued_at)
    return table


def upgrade() -> None:
    before = _training_runs(OLD_STATUSES, queue_columns=False)
    with op.batch_alter_table("training_runs", copy_from=before) as batch:
        batch.alter_column("status", existing_type=_status(*OLD_STATUSES), type_=_status(*NEW_STATUSES))
        batch.add_column(sa.Column("queued_at", TIMESTAMP, nullable=True))
        batch.add_column(sa.Column("options", JSON, nullable=True))
        batch.add_column(sa.Column("notify_channel", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("worker", sa.String(length=128), nullable=True))
        batch.create_index("ix_training_runs_queue", ["status", "queued_at"])
    op.create_table(
        "training_run_events",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("run_id", BIG_ID, nullable=False),
        sa.Column("event", JSON, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["training_runs.id"],
            name=op.f("fk_training_run_events_run_id_training_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_run_events")),
    )
    op.create_index("ix_training_run_events_run", "training_run_events", ["run_id", "id"])


def downgrade() -> None:
    op.drop_table("training_run_events")
    # a queued run never started: nothing to keep of it in the older schema
    op.execute(sa.text("DELETE FROM training_runs WHERE status = 'queued'"))
    before = _training_runs(NEW_STATUSES, queue_columns=True)
    with op.batch_alter_table("training_runs", copy_from=before) as batch:
        batch.drop_index("ix_training_runs_queue")
        batch.drop_column("worker")
        batch.drop_column("notify_channel")
        batch.drop_column("options")
        batch.drop_column("queued_at")
        batch.alter_column("status", existing_type=_status(*NEW_STATUSES), type_=_status(*OLD_STATUSES))

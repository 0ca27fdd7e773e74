"""Database tables: Slack messages, predictions, corrections, training runs and the audit log.

Label heads are data (a ``head`` column), never columns, so a schema with other heads needs no migration.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import DateTime, TypeDecorator

# Explicit constraint names so SQLite and PostgreSQL get identical, migratable schemas.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Slack ids and timestamps ("1700000000.000100") are short strings.
SLACK_ID = 32
SLACK_TS = 32


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on both databases.

    SQLite stores no offset, so values are normalised to UTC on the way in and tagged UTC on the way out;
    naive datetimes are taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        # SQLite compares datetimes as strings: drop the offset so every stored value has one format.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# BIGINT on PostgreSQL; SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# JSONB on PostgreSQL (indexable, compact); plain JSON text on SQLite.
JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    """A portable enum: VARCHAR plus a named CHECK constraint storing the values (not the member names)."""
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class MessageState(enum.StrEnum):
    PENDING = "pending"  # stored, waiting for (re)classification
    CLASSIFIED = "classified"
    SKIPPED = "skipped"  # not to be classified (filtered out, or retries exhausted)


class CorrectionKind(enum.StrEnum):
    CORRECTION = "correction"  # a user set a label other than the one standing (``old_label``)
    CONFIRMATION = "confirmation"  # a user agreed with the label standing: the model's, or a person's


class CorrectionSource(enum.StrEnum):
    REACTION = "reaction"
    BUTTON = "button"
    COMMAND = "command"


class TrainingTrigger(enum.StrEnum):
    SCHEDULE = "schedule"
    COMMAND = "command"  # a Slack command
    CLI = "cli"


class TrainingStatus(enum.StrEnum):
    QUEUED = "queued"  # waiting for a `triage worker` to claim it
    RUNNING = "running"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    FAILED = "failed"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSONType}


class Message(Base):
    """A Slack message the bot saw, and where its reply lives."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    team_id: Mapped[str] = mapped_column(String(SLACK_ID))
    channel_id: Mapped[str] = mapped_column(String(SLACK_ID))
    ts: Mapped[str] = mapped_column(String(SLACK_TS))
    thread_ts: Mapped[str | None] = mapped_column(String(SLACK_TS))
    user_id: Mapped[str | None] = mapped_column(String(SLACK_ID), index=True)
    # NULL once removed by retention or because the author asked to be forgotten.
    text: Mapped[str | None] = mapped_column(Text)
    text_removed_at: Mapped[datetime | None]
    # The author's last edit (labels given before it were given to an earlier text) and their deletion.
    edited_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(index=True, default=utcnow)
    # Set before the reply is posted; without reply_ts it means "a reply may be in Slack" (bot.triage).
    reply_channel_id: Mapped[str | None] = mapped_column(String(SLACK_ID))
    reply_ts: Mapped[str | None] = mapped_column(String(SLACK_TS))
    state: Mapped[MessageState] = mapped_column(
        _enum(MessageState, "message_state"), default=MessageState.PENDING
    )
    # How many times a worker claimed the message for (re)classification.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    classified_at: Mapped[datetime | None]

    predictions: Mapped[list[Prediction]] = relationship(
        back_populates="message", cascade="all, delete-orphan", passive_deletes=True
    )
    corrections: Mapped[list[Correction]] = relationship(
        back_populates="message", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (
        UniqueConstraint("team_id", "channel_id", "ts"),
        # A reaction on the bot's reply must find its message.
        Index("ix_messages_reply", "team_id", "reply_channel_id", "reply_ts", unique=True),
        # The pending-work sweep.
        Index("ix_messages_due", "state", "next_attempt_at"),
    )

    def __repr__(self) -> str:
        return f"<Message {self.id} {self.team_id}/{self.channel_id}/{self.ts} {self.state}>"


class SlackEvent(Base):
    """An event id already handled, so Slack's retried deliveries are recognised."""

    __tablename__ = "slack_events"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(index=True, default=utcnow)


class Prediction(Base):
    """One model version's output for one message; per-head results live in ``PredictionHead``."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    # The registry version's name: model versions live in the registry (classifier/registry.py), not here.
    model_version: Mapped[str] = mapped_column(String(128), index=True)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Why this label: the training messages most like this one, each {"label", "similarity"} and either
    # "message_id" (a Slack message: its text is read when shown, so forgetting it needs nothing here) or
    # "text" (a row of the operator's dataset). None: not asked for (predictions from before 0008).
    neighbors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)

    message: Mapped[Message] = relationship(back_populates="predictions")
    heads: Mapped[list[PredictionHead]] = relationship(
        back_populates="prediction",
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="selectin",
        order_by="PredictionHead.head",
    )

    __table_args__ = (Index("ix_predictions_message", "message_id", "created_at"),)

    def by_head(self) -> dict[str, PredictionHead]:
        return {h.head: h for h in self.heads}


class PredictionHead(Base):
    __tablename__ = "prediction_heads"

    prediction_id: Mapped[int] = mapped_column(
        ForeignKey("predictions.id", ondelete="CASCADE"), primary_key=True
    )
    head: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[str] = mapped_column(String(128))
    confidence: Mapped[float] = mapped_column(Float)
    # label -> probability, for every label the head knows.
    scores: Mapped[dict[str, Any]]

    prediction: Mapped[Prediction] = relationship(back_populates="heads")


class Correction(Base):
    """A user's label for one head of one message: a change (correction) or an agreement (confirmation).

    The label of a message's head is its latest non-retracted correction.
    """

    __tablename__ = "corrections"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    head: Mapped[str] = mapped_column(String(64))
    kind: Mapped[CorrectionKind] = mapped_column(_enum(CorrectionKind, "correction_kind"))
    old_label: Mapped[str | None] = mapped_column(String(128))
    new_label: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(SLACK_ID))
    source: Mapped[CorrectionSource] = mapped_column(_enum(CorrectionSource, "correction_source"))
    # The reaction name, so removing the reaction retracts this correction.
    reaction: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(index=True, default=utcnow)
    retracted_at: Mapped[datetime | None]

    message: Mapped[Message] = relationship(back_populates="corrections")

    __table_args__ = (
        Index("ix_corrections_label", "message_id", "head", "created_at"),
        Index("ix_corrections_reaction", "message_id", "user_id", "reaction"),
    )


class ForgottenUser(Base):
    """Someone who asked to be forgotten: their texts are removed and never stored or exported again."""

    __tablename__ = "forgotten_users"

    user_id: Mapped[str] = mapped_column(String(SLACK_ID), primary_key=True)
    forgotten_at: Mapped[datetime] = mapped_column(default=utcnow)
    requested_by: Mapped[str | None] = mapped_column(String(SLACK_ID))


class TrainingRun(Base):
    """One retraining attempt: train a candidate, compare it with the incumbent, promote or reject.

    A run for a `triage worker` starts 'queued' with its ``options`` (epochs, gate, acceptance); the worker
    claims it ('running', ``worker`` set) and writes its progress as ``TrainingRunEvent`` rows.
    """

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    trigger: Mapped[TrainingTrigger] = mapped_column(_enum(TrainingTrigger, "training_trigger"))
    requested_by: Mapped[str | None] = mapped_column(String(SLACK_ID))
    status: Mapped[TrainingStatus] = mapped_column(_enum(TrainingStatus, "training_status"))
    started_at: Mapped[datetime] = mapped_column(index=True, default=utcnow)
    finished_at: Mapped[datetime | None]
    train_examples: Mapped[int | None] = mapped_column(Integer)
    eval_examples: Mapped[int | None] = mapped_column(Integer)
    candidate_metrics: Mapped[dict[str, Any] | None]
    incumbent_metrics: Mapped[dict[str, Any] | None]
    candidate_version: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    queued_at: Mapped[datetime | None]
    options: Mapped[dict[str, Any] | None]
    notify_channel: Mapped[str | None] = mapped_column(String(SLACK_ID))  # where the bot posts progress
    worker: Mapped[str | None] = mapped_column(String(128))  # who claimed it: "host:pid (device)"

    __table_args__ = (
        # the worker's claim: the oldest queued run
        Index("ix_training_runs_queue", "status", "queued_at"),
    )


class TrainingRunEvent(Base):
    """One progress event of a run (the JSON lines ``python -m bot.retrain --progress-json`` prints)."""

    __tablename__ = "training_run_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"))
    event: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_training_run_events_run", "run_id", "id"),)


class AuditEntry(Base):
    """An admin action someone asked for, and whether it was allowed."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(SLACK_ID), index=True)
    action: Mapped[str] = mapped_column(String(64))
    args: Mapped[dict[str, Any]] = mapped_column(default=dict)
    allowed: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(index=True, default=utcnow)


class EscalationState(enum.StrEnum):
    ESCALATED = "escalated"  # announced in the escalation channel
    ACKNOWLEDGED = "acknowledged"  # an agent said they are on it
    DEESCALATED = "deescalated"  # no longer urgent: the post says so


class Card(Base):
    """A triaged message's internal surfaces: its card in the card channel, who claimed it, its escalation.

    A card waits here (``due_at`` set) until it is posted, so a burst never loses one; urgent ones first.
    """

    __tablename__ = "cards"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    channel_id: Mapped[str | None] = mapped_column(String(SLACK_ID))  # where the card was posted
    ts: Mapped[str | None] = mapped_column(String(SLACK_TS))
    due_at: Mapped[datetime | None]  # waiting to be posted (or retried) from then; NULL once posted
    urgent: Mapped[bool] = mapped_column(Boolean, default=False)  # posted before the others
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(SLACK_ID))
    claimed_at: Mapped[datetime | None]
    not_request_by: Mapped[str | None] = mapped_column(String(SLACK_ID))
    escalation_state: Mapped[EscalationState | None] = mapped_column(
        _enum(EscalationState, "escalation_state")
    )
    escalation_channel_id: Mapped[str | None] = mapped_column(String(SLACK_ID))
    escalation_ts: Mapped[str | None] = mapped_column(String(SLACK_TS))
    escalated_by: Mapped[str | None] = mapped_column(String(SLACK_ID))  # NULL: the model's labels did
    escalated_at: Mapped[datetime | None]
    escalation_topic: Mapped[str | None] = mapped_column(String(128))  # the topic when it was escalated
    acknowledged_by: Mapped[str | None] = mapped_column(String(SLACK_ID))
    deescalated_by: Mapped[str | None] = mapped_column(String(SLACK_ID))

    __table_args__ = (
        # the card queue: urgent first, then oldest
        Index("ix_cards_due", "due_at", "urgent"),
        # a button on a card must find its message
        Index("ix_cards_posted", "channel_id", "ts"),
        # incidents: recent escalations of one topic
        Index("ix_cards_escalations", "escalation_topic", "escalated_at"),
    )


class Incident(Base):
    """A "possible incident": a burst of urgent messages of one topic; later escalations of the topic are
    threaded under its post while they keep coming (each within the incident window of the last)."""

    __tablename__ = "incidents"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    topic: Mapped[str] = mapped_column(String(128))
    channel_id: Mapped[str | None] = mapped_column(String(SLACK_ID))  # the post, in the escalation channel
    ts: Mapped[str | None] = mapped_column(String(SLACK_TS))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_escalation_at: Mapped[datetime] = mapped_column(default=utcnow)
    escalations: Mapped[int] = mapped_column(Integer, default=0)
    # the topic while this incident takes its escalations, NULL once a later one of the topic started:
    # unique, so two replicas cannot both start one (one "possible incident" post per burst)
    open_topic: Mapped[str | None] = mapped_column(String(128))

    __table_args__ = (
        Index("ix_incidents_recent", "topic", "last_escalation_at"),
        Index("ux_incidents_open_topic", "open_topic", unique=True),
    )


class ScheduledPost(Base):
    """A scheduled post (the digest, a drift alert) claimed for one schedule slot: replicas sharing the
    database each try to insert the row, and only the one that did posts."""

    __tablename__ = "scheduled_posts"

    job: Mapped[str] = mapped_column(String(64), primary_key=True)
    slot: Mapped[datetime] = mapped_column(primary_key=True)  # the scheduled time, to the minute
    claimed_at: Mapped[datetime] = mapped_column(default=utcnow)

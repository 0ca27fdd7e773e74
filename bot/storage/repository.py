"""The queries the bot and retraining need.

Every function takes an ``AsyncSession`` and leaves the transaction to the caller, one unit of work each::

    async with session_factory.begin() as session:
        message, created = await store_message(session, team_id=..., channel_id=..., ts=..., ...)

Times are timezone-aware UTC; each function takes ``now`` for tests and defaults to the clock.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Result,
    Row,
    Select,
    and_,
    case,
    delete,
    exists,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from bot.storage.models import (
    AuditEntry,
    Card,
    Correction,
    CorrectionKind,
    CorrectionSource,
    ForgottenUser,
    Incident,
    Message,
    MessageState,
    Prediction,
    PredictionHead,
    ScheduledPost,
    SlackEvent,
    TrainingRun,
    TrainingRunEvent,
    TrainingStatus,
    TrainingTrigger,
    utcnow,
)
from classifier.results import HeadPrediction

# How long a claimed message belongs to its worker before another may take it (a crash must not lose it).
DEFAULT_LEASE = timedelta(minutes=2)
RETRY_BASE_DELAY = timedelta(seconds=30)
RETRY_MAX_DELAY = timedelta(minutes=10)
# Ids per IN (...) list: well under SQLite's and asyncpg's limits on bound parameters.
ID_CHUNK = 1000


# --- value types ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingExample:
    """A message text and its human labels (only the heads someone labelled)."""

    message_id: int
    text: str
    labels: dict[str, str]


@dataclass(frozen=True)
class FeedbackCounts:
    corrections: int
    confirmations: int

    @property
    def total(self) -> int:
        return self.corrections + self.confirmations


@dataclass(frozen=True)
class Stats:
    """What a status command shows: activity since a time, and the backlog now."""

    since: datetime
    messages: int
    predictions: int
    corrections: int
    confirmations: int
    pending: int


@dataclass(frozen=True)
class Backlog:
    """Messages waiting for an answer: all of them, those that failed at least once, the oldest's arrival."""

    waiting: int
    failed: int
    oldest: datetime | None


# --- helpers -------------------------------------------------------------------------------------------


def _dialect(session: AsyncSession) -> str:
    return session.sync_session.get_bind().dialect.name


def _insert(session: AsyncSession, entity: type[Any]) -> Any:
    """``INSERT`` with ``ON CONFLICT`` support for the session's database."""
    if _dialect(session) == "postgresql":
        return postgresql.insert(entity)
    return sqlite.insert(entity)


def _rowcount(result: Result[Any]) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


def _require_one(result: Result[Any], missing: str) -> None:
    if _rowcount(result) == 0:
        raise LookupError(missing)


async def _count(session: AsyncSession, query: Select[Any]) -> int:
    return int(await session.scalar(query) or 0)


# --- Slack events --------------------------------------------------------------------------------------


async def record_event(session: AsyncSession, event_id: str, *, now: datetime | None = None) -> bool:
    """Remember a Slack event id; ``False`` when it was seen before (a retried delivery).

    Race-safe: of two concurrent deliveries exactly one gets ``True`` (primary key + ON CONFLICT DO NOTHING).
    """
    return event_id in await _record_events(session, [event_id], now or utcnow())


async def delete_events_before(session: AsyncSession, before: datetime) -> int:
    """Forget event ids older than ``before`` (Slack retries within minutes; a day is plenty)."""
    result = await session.execute(
        delete(SlackEvent).where(SlackEvent.received_at < before).execution_options(synchronize_session=False)
    )
    return _rowcount(result)


# --- messages ------------------------------------------------------------------------------------------

# Lone surrogates (JSON's "\ud800") cannot be encoded as UTF-8, and PostgreSQL's text refuses NUL.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str) -> str:
    """``text`` as both databases store it: lone surrogates and NUL replaced by U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", text)


def _storable_json(value: Any) -> Any:
    """``storable_text`` for every string in a JSON value (PostgreSQL's jsonb refuses them too)."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, Mapping):
        return {storable_text(str(k)): _storable_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable_json(v) for v in value]
    return value


async def store_message(
    session: AsyncSession,
    *,
    team_id: str,
    channel_id: str,
    ts: str,
    user_id: str | None,
    text: str | None,
    thread_ts: str | None = None,
    received_at: datetime | None = None,
    state: MessageState = MessageState.PENDING,
    lease: timedelta = DEFAULT_LEASE,
    now: datetime | None = None,
) -> tuple[Message, bool]:
    """Store a Slack message once; returns the row and whether this call created it.

    Concurrent calls for the same (team, channel, ts) yield one row (ON CONFLICT DO NOTHING). A pending
    message belongs to the caller for ``lease``: if it is not classified by then, ``claim_due_messages``
    hands it to the retry worker. A forgotten user's message is stored without its text.
    """
    now = now or utcnow()
    received_at = received_at or now
    removed_at = None
    if text is not None and user_id is not None and await is_forgotten(session, user_id):
        text, removed_at = None, now
    stmt = (
        _insert(session, Message)
        .values(
            team_id=team_id,
            channel_id=channel_id,
            ts=ts,
            thread_ts=thread_ts,
            user_id=user_id,
            text=text,
            text_removed_at=removed_at,
            received_at=received_at,
            state=state,
            attempts=0,
            next_attempt_at=now + lease if state == MessageState.PENDING else None,
        )
        .on_conflict_do_nothing(index_elements=["team_id", "channel_id", "ts"])
        .returning(Message.id)
    )
    created = (await session.execute(stmt)).first() is not None
    message = await get_message(session, team_id, channel_id, ts)
    if message is None:  # only if the row was deleted between the two statements
        raise LookupError(f"message {team_id}/{channel_id}/{ts} vanished while being stored")
    return message, created


@dataclass(frozen=True)
class NewMessage:
    """A message from a Slack event, to store with ``store_new_messages``."""

    team_id: str
    channel_id: str
    ts: str
    user_id: str | None
    text: str
    thread_ts: str | None = None
    event_id: str | None = None  # Slack's event id: a retried delivery of it stores nothing
    state: MessageState = MessageState.PENDING
    leased: bool = True  # pending: leased to the one storing it (attempts 0), else due now for any taker

    @property
    def key(self) -> tuple[str, str, str]:
        return self.team_id, self.channel_id, self.ts


async def store_new_messages(
    session: AsyncSession,
    batch: Sequence[NewMessage],
    *,
    lease: timedelta = DEFAULT_LEASE,
    now: datetime | None = None,
) -> list[Message | None]:
    """Store messages from Slack events, as ``record_event`` and ``store_message`` would one by one, in
    four statements whatever the batch's size; for each, its new row, or ``None`` when its event id or
    its (team, channel, ts) was stored before (or earlier in the batch). Race-safe like those two."""
    now = now or utcnow()
    fresh_events = await _record_events(session, {m.event_id for m in batch if m.event_id}, now)
    forgotten = await _forgotten_among(session, {m.user_id for m in batch if m.user_id and m.text})
    first: dict[tuple[str, str, str], NewMessage] = {}
    for m in batch:
        if m.event_id is not None and m.event_id not in fresh_events:
            continue
        fresh_events.discard(m.event_id or "")  # a second delivery of an event within the batch
        first.setdefault(m.key, m)
    if not first:
        return [None] * len(batch)
    rows = [
        {
            "team_id": m.team_id,
            "channel_id": m.channel_id,
            "ts": m.ts,
            "thread_ts": m.thread_ts,
            "user_id": m.user_id,
            "text": None if m.user_id in forgotten else m.text,
            "text_removed_at": now if m.user_id in forgotten else None,
            "received_at": now,
            "state": m.state,
            "attempts": 0,
            "next_attempt_at": _next_attempt(m, now, lease),
        }
        for m in first.values()
    ]
    # Core executemany of one cached statement (sent as one multi-row INSERT): no ORM per row
    stmt = (
        _insert(session, Message.__table__)
        .on_conflict_do_nothing(index_elements=["team_id", "channel_id", "ts"])
        .returning(Message.id)
    )
    inserted = (await session.execute(stmt, rows)).scalars()
    created = {
        (m.team_id, m.channel_id, m.ts): m
        for m in await session.scalars(select(Message).where(Message.id.in_(list(inserted))))
    }
    return [created.pop(m.key) if first.get(m.key) is m and m.key in created else None for m in batch]


def _next_attempt(message: NewMessage, now: datetime, lease: timedelta) -> datetime | None:
    if message.state != MessageState.PENDING:
        return None
    return now + lease if message.leased else now


async def _record_events(session: AsyncSession, event_ids: Collection[str], now: datetime) -> set[str]:
    """The event ids among ``event_ids`` not seen before, now recorded."""
    if not event_ids:
        return set()
    stmt = (
        _insert(session, SlackEvent.__table__)
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(SlackEvent.event_id)
    )
    rows = [{"event_id": event_id, "received_at": now} for event_id in event_ids]
    return set((await session.execute(stmt, rows)).scalars())


async def _forgotten_among(session: AsyncSession, user_ids: Collection[str]) -> set[str]:
    if not user_ids:
        return set()
    query = select(ForgottenUser.user_id).where(ForgottenUser.user_id.in_(list(user_ids)))
    return set(await session.scalars(query))


async def get_message(session: AsyncSession, team_id: str, channel_id: str, ts: str) -> Message | None:
    """The message posted at ``ts`` in a channel."""
    return await session.scalar(
        select(Message)
        .where(Message.team_id == team_id, Message.channel_id == channel_id, Message.ts == ts)
        .execution_options(populate_existing=True)
    )


async def get_message_by_reply(
    session: AsyncSession, team_id: str, reply_channel_id: str, reply_ts: str
) -> Message | None:
    """The message the bot's reply at ``reply_ts`` answers (a reaction on the reply lands here)."""
    return await session.scalar(
        select(Message).where(
            Message.team_id == team_id,
            Message.reply_channel_id == reply_channel_id,
            Message.reply_ts == reply_ts,
        )
    )


async def record_reply_intent(session: AsyncSession, message_id: int, *, channel_id: str) -> None:
    """Before a reply is posted: ``reply_channel_id`` set and ``reply_ts`` not yet means "a reply may be
    in Slack already", so a later attempt looks for it in the thread before it posts (``bot.triage``)."""
    result = await session.execute(
        update(Message).where(Message.id == message_id).values(reply_channel_id=channel_id)
    )
    _require_one(result, f"no message with id {message_id}")


async def set_reply(session: AsyncSession, message_id: int, *, channel_id: str, ts: str) -> None:
    """Record where the bot's reply to a message lives."""
    result = await session.execute(
        update(Message).where(Message.id == message_id).values(reply_channel_id=channel_id, reply_ts=ts)
    )
    _require_one(result, f"no message with id {message_id}")


async def replace_text(
    session: AsyncSession,
    message_id: int,
    text: str,
    *,
    lease: timedelta = DEFAULT_LEASE,
    now: datetime | None = None,
) -> Message:
    """The author edited the message: store the new text and make it pending again, owned by the caller
    for ``lease`` like a newly claimed message (``claim_due_messages``). Its labels stay; those older
    than ``edited_at`` were given to the earlier text. A forgotten user's edit is not stored either."""
    now = now or utcnow()
    message = await session.get(Message, message_id, populate_existing=True)
    if message is None:
        raise LookupError(f"no message with id {message_id}")
    if message.user_id is not None and await is_forgotten(session, message.user_id):
        message.text, message.text_removed_at = None, now
    else:
        message.text, message.text_removed_at = text, None
    message.edited_at = now
    message.state = MessageState.PENDING
    message.attempts += 1  # a new lease: an attempt still at work on the earlier text records nothing
    message.next_attempt_at = now + lease
    message.last_error = None
    await session.flush()
    return message


async def mark_deleted(session: AsyncSession, message_id: int, *, now: datetime | None = None) -> Message:
    """The author deleted the message: its text goes as ``forget_user`` removes texts, it is never
    classified again, and its labels are not trained on (no text)."""
    now = now or utcnow()
    await remove_text(session, message_id, now=now)
    message = await session.get(Message, message_id, populate_existing=True)
    if message is None:
        raise LookupError(f"no message with id {message_id}")
    message.deleted_at = message.deleted_at or now
    if message.state == MessageState.PENDING:
        message.state, message.next_attempt_at, message.last_error = MessageState.SKIPPED, None, "deleted"
    await session.flush()
    return message


async def thread_messages(
    session: AsyncSession, team_id: str, channel_id: str, thread_ts: str
) -> list[Message]:
    """A thread's messages the bot stored: the parent (at ``thread_ts``) and the replies, oldest first."""
    query = (
        select(Message)
        .where(
            Message.team_id == team_id,
            Message.channel_id == channel_id,
            or_(Message.ts == thread_ts, Message.thread_ts == thread_ts),
        )
        .order_by(Message.id)
        .execution_options(populate_existing=True)
    )
    return list((await session.scalars(query)).all())


@dataclass(frozen=True)
class Heard:
    """A message stored from a channel, as a backfill compares it with what Slack lists."""

    ts: str
    thread_ts: str | None
    own_reply_ts: str | None  # the bot's reply in the message's thread (thread delivery), if any
    received_at: datetime  # when it was stored: live, or by an earlier backfill


async def stored_since(session: AsyncSession, team_id: str, channel_id: str, oldest: str) -> list[Heard]:
    """The messages stored from a channel after ``oldest``.

    Slack's ts ("1700000000.000100") have ten-digit seconds until 2286, so they compare as strings."""
    rows = await session.execute(
        select(
            Message.ts, Message.thread_ts, Message.reply_channel_id, Message.reply_ts, Message.received_at
        ).where(Message.team_id == team_id, Message.channel_id == channel_id, Message.ts > oldest)
    )
    return [
        Heard(ts, thread_ts, reply_ts if reply_channel == channel_id else None, received_at)
        for ts, thread_ts, reply_channel, reply_ts, received_at in rows
    ]


# --- pending work --------------------------------------------------------------------------------------


async def claim_due_messages(
    session: AsyncSession,
    *,
    limit: int = 50,
    lease: timedelta = DEFAULT_LEASE,
    now: datetime | None = None,
) -> list[Message]:
    """Take up to ``limit`` pending messages whose next attempt is due, oldest first.

    Claimed messages get ``attempts + 1`` and are hidden from other workers for ``lease``. PostgreSQL
    workers skip rows another worker is claiming (FOR UPDATE SKIP LOCKED); SQLite has a single writer,
    so the one UPDATE statement is already exclusive.

    A lease is the pair (message id, ``attempts``): each claim (and each edit, ``replace_text``) makes a
    new one, so an attempt that outlived its lease is told apart from the one that took over
    (``hold_lease``). A new message is leased to the one who stored it with ``attempts`` 0.
    """
    now = now or utcnow()
    due = (
        select(Message.id)
        .where(Message.state == MessageState.PENDING, Message.next_attempt_at <= now)
        .order_by(Message.next_attempt_at, Message.id)
        .limit(limit)
    )
    if _dialect(session) == "postgresql":
        due = due.with_for_update(skip_locked=True)
    stmt = (
        update(Message)
        .where(Message.id.in_(due.scalar_subquery()))
        .values(attempts=Message.attempts + 1, next_attempt_at=now + lease)
        .returning(Message)
    )
    claimed = (
        await session.scalars(
            stmt, execution_options={"synchronize_session": False, "populate_existing": True}
        )
    ).all()
    return sorted(claimed, key=lambda m: m.id)


class LeaseLost(RuntimeError):
    """The message is no longer this attempt's to answer: it was answered, edited, or its lease ran out and
    another attempt took it over."""


async def hold_lease(
    session: AsyncSession,
    message_id: int,
    attempt: int,
    *,
    lease: timedelta = DEFAULT_LEASE,
    now: datetime | None = None,
) -> None:
    """The first statement of a transaction that writes what an attempt did with a message: it goes on only
    while that attempt's lease (``attempts == attempt``, still pending) is the message's, extended by
    ``lease``; otherwise ``LeaseLost``. The row stays locked until the commit, so no claim overtakes it."""
    result = await session.execute(
        update(Message)
        .where(Message.id == message_id, Message.state == MessageState.PENDING, Message.attempts == attempt)
        .values(next_attempt_at=(now or utcnow()) + lease)
    )
    if _rowcount(result) != 1:
        raise LeaseLost(f"message {message_id} is no longer leased to attempt {attempt}")


async def renew_leases(
    session: AsyncSession,
    held: Mapping[int, int],
    *,
    lease: timedelta = DEFAULT_LEASE,
    now: datetime | None = None,
) -> set[int]:
    """Extend the leases a process holds (message id → attempt) by ``lease`` from now: messages that wait in
    its memory or are being answered are not claimed by anyone else meanwhile. Returns the ids still held
    (the others were answered, edited or taken over)."""
    now = now or utcnow()
    pairs = sorted(held.items())
    kept: set[int] = set()
    for start in range(0, len(pairs), ID_CHUNK // 2):  # two bound parameters a pair
        result = await session.execute(
            update(Message)
            .where(
                tuple_(Message.id, Message.attempts).in_(pairs[start : start + ID_CHUNK // 2]),
                Message.state == MessageState.PENDING,
            )
            .values(next_attempt_at=now + lease)
            .returning(Message.id)
            .execution_options(synchronize_session=False)
        )
        kept.update(result.scalars())
    return kept


async def release_message(
    session: AsyncSession, message_id: int, attempt: int, *, now: datetime | None = None
) -> None:
    """Give up an attempt's lease of a pending message: ``claim_due_messages`` may take it at once."""
    await session.execute(
        update(Message)
        .where(Message.id == message_id, Message.state == MessageState.PENDING, Message.attempts == attempt)
        .values(next_attempt_at=now or utcnow())
    )


async def mark_classified(session: AsyncSession, message_id: int, *, now: datetime | None = None) -> None:
    result = await session.execute(
        update(Message)
        .where(Message.id == message_id)
        .values(
            state=MessageState.CLASSIFIED,
            classified_at=now or utcnow(),
            next_attempt_at=None,
            last_error=None,
        )
    )
    _require_one(result, f"no message with id {message_id}")


async def mark_skipped(session: AsyncSession, message_id: int, *, reason: str | None = None) -> None:
    """Never classify this message (filtered out, or not worth retrying)."""
    result = await session.execute(
        update(Message)
        .where(Message.id == message_id)
        .values(state=MessageState.SKIPPED, next_attempt_at=None, last_error=reason)
    )
    _require_one(result, f"no message with id {message_id}")


async def schedule_retry(
    session: AsyncSession,
    message_id: int,
    *,
    error: str,
    now: datetime | None = None,
    base_delay: timedelta = RETRY_BASE_DELAY,
    max_delay: timedelta = RETRY_MAX_DELAY,
) -> datetime:
    """After a failure that can pass (classifier or Slack unreachable): retry later; returns when.

    The delay doubles with each claim (``attempts``) up to ``max_delay``, and the message is never given
    up: an outage of any length only delays its answer. What cannot pass is ``mark_skipped`` instead.
    """
    now = now or utcnow()
    message = await session.get(Message, message_id, populate_existing=True)
    if message is None:
        raise LookupError(f"no message with id {message_id}")
    message.last_error = error[:2000]
    delay = min(base_delay * (2 ** min(message.attempts, 30)), max_delay)
    message.state = MessageState.PENDING
    message.next_attempt_at = now + delay
    await session.flush()
    return message.next_attempt_at


async def count_pending(session: AsyncSession) -> int:
    return await _count(
        session, select(func.count()).select_from(Message).where(Message.state == MessageState.PENDING)
    )


async def backlog(session: AsyncSession) -> Backlog:
    """Messages stored and not answered yet: how many, how many after a failure, since when."""
    waiting, failed, oldest = (
        await session.execute(
            select(
                func.count(),
                func.count(Message.last_error),
                func.min(Message.received_at),
            ).where(Message.state == MessageState.PENDING)
        )
    ).one()
    return Backlog(waiting=int(waiting), failed=int(failed), oldest=oldest)


def _requeueable() -> Any:
    """Skipped messages that have text to classify (not empty, not forgotten or purged)."""
    has_text = Message.text.is_not(None) & (func.trim(Message.text) != "")
    return (Message.state == MessageState.SKIPPED) & has_text


async def count_skipped(session: AsyncSession) -> int:
    return await _count(session, select(func.count()).select_from(Message).where(_requeueable()))


async def requeue_skipped(session: AsyncSession, *, now: datetime | None = None) -> int:
    """Make every skipped message with text pending again, due now; returns how many.

    A reply posted before it was skipped is updated, never posted twice (``Message.reply_ts``).
    """
    result = await session.execute(
        update(Message)
        .where(_requeueable())
        .values(state=MessageState.PENDING, attempts=0, next_attempt_at=now or utcnow(), last_error=None)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result)


# --- predictions ---------------------------------------------------------------------------------------


async def add_prediction(
    session: AsyncSession,
    message_id: int,
    model_version: str,
    heads: Mapping[str, HeadPrediction],
    *,
    latency_ms: float | None = None,
    neighbors: list[dict[str, Any]] | None = None,
    now: datetime | None = None,
) -> Prediction:
    """Store one model version's output for a message (a message may have several); ``neighbors``: why
    this label, as ``Prediction.neighbors`` holds it."""
    if not heads:
        raise ValueError("a prediction needs at least one head")
    prediction = Prediction(
        message_id=message_id,
        model_version=model_version,
        latency_ms=latency_ms,
        neighbors=neighbors,
        created_at=now or utcnow(),
        heads=[
            PredictionHead(
                head=head,
                label=p.label,
                confidence=float(p.confidence),
                scores={str(k): float(v) for k, v in p.scores.items()},
            )
            for head, p in heads.items()
        ],
    )
    session.add(prediction)
    await session.flush()
    return prediction


async def latest_prediction(
    session: AsyncSession, message_id: int, *, model_version: str | None = None
) -> Prediction | None:
    """The newest prediction for a message (optionally from one model version), heads loaded."""
    query = select(Prediction).where(Prediction.message_id == message_id)
    if model_version is not None:
        query = query.where(Prediction.model_version == model_version)
    return await session.scalar(query.order_by(Prediction.created_at.desc(), Prediction.id.desc()).limit(1))


# --- corrections and labels ----------------------------------------------------------------------------


async def add_correction(
    session: AsyncSession,
    message_id: int,
    head: str,
    new_label: str,
    *,
    user_id: str,
    source: CorrectionSource,
    kind: CorrectionKind = CorrectionKind.CORRECTION,
    old_label: str | None = None,
    reaction: str | None = None,
    now: datetime | None = None,
) -> Correction:
    """Record a user's label for one head (a confirmation: ``new_label`` is the label they agreed with).

    Every correction is kept; the latest non-retracted one is the label.
    """
    correction = Correction(
        message_id=message_id,
        head=head,
        kind=kind,
        old_label=old_label,
        new_label=new_label,
        user_id=user_id,
        source=source,
        reaction=reaction,
        created_at=now or utcnow(),
    )
    session.add(correction)
    await session.flush()
    return correction


async def retract_correction(
    session: AsyncSession, message_id: int, *, user_id: str, reaction: str, now: datetime | None = None
) -> int:
    """A removed reaction: retract that user's corrections made with it; returns how many."""
    result = await session.execute(
        update(Correction)
        .where(
            Correction.message_id == message_id,
            Correction.user_id == user_id,
            Correction.reaction == reaction,
            Correction.retracted_at.is_(None),
        )
        .values(retracted_at=now or utcnow())
    )
    return _rowcount(result)


def _labels_standing_at(as_of: datetime | None = None, heads: Collection[str] | None = None) -> Select[Any]:
    """(message_id, head, label) of the correction standing per message and head at ``as_of``: the latest
    made by then and not retracted by then (later corrections ignored, later retractions not yet made),
    so an export with a cut-off is reproducible. Without ``as_of``: now, as ``standing_corrections``.
    """
    conditions: list[ColumnElement[bool]] = []
    if as_of is None:
        conditions.append(Correction.retracted_at.is_(None))
    else:
        conditions += [
            Correction.created_at <= as_of,
            or_(Correction.retracted_at.is_(None), Correction.retracted_at > as_of),
        ]
    if heads is not None:
        conditions.append(Correction.head.in_(list(heads)))
    rank = (
        func.row_number()
        .over(
            partition_by=(Correction.message_id, Correction.head),
            order_by=(Correction.created_at.desc(), Correction.id.desc()),
        )
        .label("rank")
    )
    label = Correction.new_label.label("label")
    sub = (
        select(Correction.message_id, Correction.head, label, Correction.created_at, rank)
        .where(*conditions)
        .subquery("ranked")
    )
    return select(sub.c.message_id, sub.c.head, sub.c.label, sub.c.created_at).where(sub.c.rank == 1)


async def standing_corrections(session: AsyncSession, message_id: int) -> dict[str, Correction]:
    """Head -> the correction or confirmation standing now: the latest not retracted (who set the label,
    and how). Heads nobody labelled (or whose labels were all retracted) are absent."""
    query = (
        select(Correction)
        .where(Correction.message_id == message_id, Correction.retracted_at.is_(None))
        .order_by(Correction.created_at, Correction.id)
    )
    # Ordered oldest first, so the latest per head is the one left in the dict.
    return {c.head: c for c in (await session.scalars(query)).all()}


async def unapplied_corrections(session: AsyncSession, message_id: int) -> list[Correction]:
    """Corrections made before the message was classified (no ``old_label`` yet) and not retracted."""
    query = (
        select(Correction)
        .where(
            Correction.message_id == message_id,
            Correction.old_label.is_(None),
            Correction.retracted_at.is_(None),
        )
        .order_by(Correction.created_at, Correction.id)
    )
    return list((await session.scalars(query)).all())


async def standing_labels(session: AsyncSession, message_id: int) -> dict[str, str]:
    """Head -> the human label standing now (of ``standing_corrections``)."""
    return {head: c.new_label for head, c in (await standing_corrections(session, message_id)).items()}


async def standing_label(session: AsyncSession, message_id: int, head: str) -> str | None:
    """One head's human label standing now (of ``standing_corrections``), or None."""
    return await session.scalar(
        select(Correction.new_label)
        .where(
            Correction.message_id == message_id,
            Correction.head == head,
            Correction.retracted_at.is_(None),
        )
        .order_by(Correction.created_at.desc(), Correction.id.desc())
        .limit(1)
    )


async def feedback_counts(
    session: AsyncSession, since: datetime, *, until: datetime | None = None
) -> FeedbackCounts:
    """Non-retracted corrections and confirmations made since a time (what triggers a retrain)."""
    query = (
        select(Correction.kind, func.count())
        .where(Correction.created_at >= since, Correction.retracted_at.is_(None))
        .group_by(Correction.kind)
    )
    if until is not None:
        query = query.where(Correction.created_at <= until)
    counts = {kind: int(n) for kind, n in (await session.execute(query)).all()}
    return FeedbackCounts(
        corrections=counts.get(CorrectionKind.CORRECTION, 0),
        confirmations=counts.get(CorrectionKind.CONFIRMATION, 0),
    )


def _not_forgotten() -> Any:
    return or_(
        Message.user_id.is_(None),
        ~exists().where(ForgottenUser.user_id == Message.user_id),
    )


async def export_training_set(
    session: AsyncSession, *, until: datetime, heads: Collection[str] | None = None
) -> list[TrainingExample]:
    """Labelled messages as of ``until``: text plus the latest non-retracted label per head.

    Leaves out messages without text (purged by retention, deleted by their author) and messages by
    forgotten users, and labels given before the message's last edit (they describe an earlier text).
    """
    latest = _labels_standing_at(as_of=until, heads=heads).subquery("latest")
    query = (
        select(Message.id, Message.text, latest.c.head, latest.c.label)
        .join(latest, latest.c.message_id == Message.id)
        .where(
            Message.text.is_not(None),
            _not_forgotten(),
            or_(Message.edited_at.is_(None), latest.c.created_at >= Message.edited_at),
        )
        .order_by(Message.id, latest.c.head)
    )
    return _group_by_message((await session.execute(query)).all())


def _group_by_message(rows: Sequence[Row[Any]]) -> list[TrainingExample]:
    """(message_id, text, head, label) rows, ordered by message, as one example per message."""
    examples: list[TrainingExample] = []
    for message_id, text, head, label in rows:
        if not examples or examples[-1].message_id != message_id:
            examples.append(TrainingExample(message_id=message_id, text=text, labels={}))
        examples[-1].labels[head] = label
    return examples


async def export_accepted_predictions(
    session: AsyncSession,
    *,
    until: datetime,
    predicted_before: datetime,
    heads: Collection[str],
    limit: int,
) -> list[TrainingExample]:
    """Predictions people let stand: each message's latest prediction, if it was made before
    ``predicted_before`` (the review window), for every head nobody labelled as of ``until``.

    The newest ``limit`` messages; texts and people as in ``export_training_set``. These rows carry the
    model's own labels, so they are for training only, never for judging a model.
    """
    if limit < 1 or not heads:
        return []
    rank = (
        func.row_number()
        .over(
            partition_by=Prediction.message_id,
            order_by=(Prediction.created_at.desc(), Prediction.id.desc()),
        )
        .label("rank")
    )
    latest = select(Prediction.id, Prediction.message_id, Prediction.created_at, rank).subquery(
        "latest_prediction"
    )
    human = _labels_standing_at(as_of=until, heads=heads).subquery("human")
    query = (
        select(Message.id, Message.text, PredictionHead.head, PredictionHead.label)
        .join(latest, and_(latest.c.message_id == Message.id, latest.c.rank == 1))
        .join(PredictionHead, PredictionHead.prediction_id == latest.c.id)
        .outerjoin(human, and_(human.c.message_id == Message.id, human.c.head == PredictionHead.head))
        .where(
            latest.c.created_at <= predicted_before,  # what the reply shows has stood for the window
            human.c.message_id.is_(None),
            PredictionHead.head.in_(list(heads)),
            Message.text.is_not(None),
            _not_forgotten(),
        )
        .order_by(Message.id.desc(), PredictionHead.head)
        .limit(limit * len(heads))  # at most one row per head and message
    )
    newest_first = _group_by_message((await session.execute(query)).all())[:limit]
    return newest_first[::-1]  # oldest first, like export_training_set


# --- retention and forgetting --------------------------------------------------------------------------


def retention_cutoff(days: int, *, now: datetime | None = None) -> datetime:
    """Texts received before this are removed by a retention of ``days`` days."""
    if days < 1:
        raise ValueError(f"retention must be at least 1 day, not {days}")
    return (now or utcnow()) - timedelta(days=days)


async def purge_message_texts(
    session: AsyncSession, *, older_than: datetime, now: datetime | None = None
) -> int:
    """Remove the text of messages received before ``older_than`` (labels stay); returns how many.

    Also removes any text of forgotten users that slipped in while they were being forgotten.
    """
    result = await session.execute(
        update(Message)
        .where(
            Message.text.is_not(None),
            or_(Message.received_at < older_than, ~_not_forgotten()),
        )
        .values(text=None, text_removed_at=now or utcnow())
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result)


async def count_purgeable_texts(session: AsyncSession, *, older_than: datetime) -> int:
    """How many texts ``purge_message_texts`` would remove (for a dry run)."""
    return await _count(
        session,
        select(func.count())
        .select_from(Message)
        .where(Message.text.is_not(None), or_(Message.received_at < older_than, ~_not_forgotten())),
    )


async def message_ids_with_text(session: AsyncSession, ids: Collection[int]) -> set[int]:
    """Those of ``ids`` whose message still has its text (not purged, forgotten or deleted)."""
    kept: set[int] = set()
    for chunk in _chunks(ids):
        kept.update((await session.scalars(select(Message.id).where(*_with_text(chunk)))).all())
    return kept


async def message_texts(session: AsyncSession, ids: Collection[int]) -> dict[int, str]:
    """id -> text for those of ``ids`` whose message still has its text (not purged, forgotten or
    deleted)."""
    texts: dict[int, str] = {}
    for chunk in _chunks(ids):
        rows = await session.execute(select(Message.id, Message.text).where(*_with_text(chunk)))
        texts.update({row.id: row.text for row in rows})
    return texts


def _chunks(ids: Collection[int]) -> list[list[int]]:
    ordered = sorted(ids)
    return [ordered[start : start + ID_CHUNK] for start in range(0, len(ordered), ID_CHUNK)]


def _with_text(ids: list[int]) -> tuple[ColumnElement[bool], ...]:
    """Those of ``ids`` whose message still has its text."""
    return Message.id.in_(ids), Message.text.is_not(None), _not_forgotten()


async def is_forgotten(session: AsyncSession, user_id: str) -> bool:
    return await session.get(ForgottenUser, user_id) is not None


async def forget_user(
    session: AsyncSession, user_id: str, *, requested_by: str | None = None, now: datetime | None = None
) -> int:
    """Remove a person's message texts and keep them out for good; returns how many texts were removed.

    Their later messages are stored without text and none of their messages is exported for training.
    Labels (theirs and on their messages) stay: they hold no text. Idempotent.
    """
    now = now or utcnow()
    await session.execute(
        _insert(session, ForgottenUser)
        .values(user_id=user_id, forgotten_at=now, requested_by=requested_by)
        .on_conflict_do_nothing(index_elements=["user_id"])
    )
    return await _remove_texts(session, Message.user_id == user_id, now=now)


async def remove_text(session: AsyncSession, message_id: int, *, now: datetime | None = None) -> int:
    """Remove one message's text as ``forget_user`` removes a person's (its labels stay); returns 0 or 1."""
    return await _remove_texts(session, Message.id == message_id, now=now or utcnow())


async def _remove_texts(session: AsyncSession, *where: ColumnElement[bool], now: datetime) -> int:
    result = await session.execute(
        update(Message).where(*where, Message.text.is_not(None)).values(text=None, text_removed_at=now)
    )
    return _rowcount(result)


# --- training runs -------------------------------------------------------------------------------------


async def start_training_run(
    session: AsyncSession,
    *,
    trigger: TrainingTrigger,
    requested_by: str | None = None,
    now: datetime | None = None,
) -> TrainingRun:
    run = TrainingRun(
        trigger=trigger, requested_by=requested_by, status=TrainingStatus.RUNNING, started_at=now or utcnow()
    )
    session.add(run)
    await session.flush()
    return run


async def finish_training_run(
    session: AsyncSession,
    run_id: int,
    *,
    status: TrainingStatus,
    train_examples: int | None = None,
    eval_examples: int | None = None,
    candidate_metrics: Mapping[str, Any] | None = None,
    incumbent_metrics: Mapping[str, Any] | None = None,
    candidate_version: str | None = None,
    error: str | None = None,
    now: datetime | None = None,
) -> TrainingRun:
    """Record how a run ended: promoted, rejected (by the gate) or failed."""
    if status == TrainingStatus.RUNNING:
        raise ValueError("a finished run needs a final status, not 'running'")
    run = await session.get(TrainingRun, run_id, populate_existing=True)
    if run is None:
        raise LookupError(f"no training run with id {run_id}")
    if run.status != TrainingStatus.RUNNING:
        raise ValueError(f"training run {run_id} already finished ({run.status})")
    run.status = status
    run.finished_at = now or utcnow()
    run.train_examples = train_examples
    run.eval_examples = eval_examples
    run.candidate_metrics = dict(candidate_metrics) if candidate_metrics is not None else None
    run.incumbent_metrics = dict(incumbent_metrics) if incumbent_metrics is not None else None
    run.candidate_version = candidate_version
    run.error = error
    await session.flush()
    return run


async def latest_training_run(
    session: AsyncSession, *, status: TrainingStatus | Collection[TrainingStatus] | None = None
) -> TrainingRun | None:
    """The most recently started run (optionally only runs with the given status or statuses)."""
    query = select(TrainingRun).order_by(TrainingRun.started_at.desc(), TrainingRun.id.desc()).limit(1)
    if isinstance(status, TrainingStatus):
        query = query.where(TrainingRun.status == status)
    elif status is not None:
        query = query.where(TrainingRun.status.in_(list(status)))
    return await session.scalar(query)


async def list_training_runs(session: AsyncSession, *, limit: int = 20) -> list[TrainingRun]:
    """Runs, newest first."""
    query = select(TrainingRun).order_by(TrainingRun.started_at.desc(), TrainingRun.id.desc()).limit(limit)
    return list((await session.scalars(query)).all())


async def fail_abandoned_training_runs(
    session: AsyncSession,
    *,
    started_before: datetime,
    now: datetime | None = None,
    error: str = "abandoned: never finished",
    event: Mapping[str, Any] | None = None,
) -> int:
    """Mark runs still 'running' since before ``started_before`` as failed (their process died); with
    ``event``, record it as each one's last progress event, so whoever follows the run learns how it ended."""
    ids = list(
        (
            await session.scalars(
                select(TrainingRun.id).where(
                    TrainingRun.status == TrainingStatus.RUNNING, TrainingRun.started_at < started_before
                )
            )
        ).all()
    )
    if not ids:
        return 0
    await session.execute(
        update(TrainingRun)
        .where(TrainingRun.id.in_(ids), TrainingRun.status == TrainingStatus.RUNNING)
        .values(status=TrainingStatus.FAILED, finished_at=now or utcnow(), error=error)
    )
    if event is not None:
        for run_id in ids:
            await add_training_run_event(session, run_id, event)
    return len(ids)


async def enqueue_training_run(
    session: AsyncSession,
    *,
    trigger: TrainingTrigger,
    options: Mapping[str, Any],
    requested_by: str | None = None,
    notify_channel: str | None = None,
    now: datetime | None = None,
) -> TrainingRun:
    """A run for a `triage worker` to claim; ``started_at`` becomes the claim time."""
    now = now or utcnow()
    run = TrainingRun(
        trigger=trigger,
        requested_by=requested_by,
        status=TrainingStatus.QUEUED,
        started_at=now,
        queued_at=now,
        options=dict(options),
        notify_channel=notify_channel,
    )
    session.add(run)
    await session.flush()
    return run


async def claim_training_run(
    session: AsyncSession, *, worker: str, now: datetime | None = None
) -> TrainingRun | None:
    """The oldest queued run, now 'running' for ``worker``; ``None`` when none waits.

    ``FOR UPDATE SKIP LOCKED`` on PostgreSQL: a run another transaction is claiming is passed over, never
    claimed twice (SQLite has one writer at a time and no row locks; the clause is left out there).
    """
    query = (
        select(TrainingRun)
        .where(TrainingRun.status == TrainingStatus.QUEUED)
        .order_by(TrainingRun.queued_at, TrainingRun.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    run = await session.scalar(query)
    if run is None:
        return None
    run.status = TrainingStatus.RUNNING
    run.started_at = now or utcnow()
    run.worker = worker
    await session.flush()
    return run


async def get_training_run(session: AsyncSession, run_id: int) -> TrainingRun | None:
    return await session.get(TrainingRun, run_id, populate_existing=True)


async def add_training_run_event(session: AsyncSession, run_id: int, event: Mapping[str, Any]) -> None:
    session.add(TrainingRunEvent(run_id=run_id, event=dict(event)))
    await session.flush()


async def training_run_events(
    session: AsyncSession, run_id: int, *, after: int = 0
) -> list[TrainingRunEvent]:
    """A run's progress events with an id above ``after``, oldest first."""
    query = (
        select(TrainingRunEvent)
        .where(TrainingRunEvent.run_id == run_id, TrainingRunEvent.id > after)
        .order_by(TrainingRunEvent.id)
    )
    return list((await session.scalars(query)).all())


# --- audit log -----------------------------------------------------------------------------------------


async def add_audit_entry(
    session: AsyncSession,
    *,
    user_id: str,
    action: str,
    allowed: bool,
    args: Mapping[str, Any] | None = None,
    reason: str | None = None,
    now: datetime | None = None,
) -> AuditEntry:
    """Record an admin action someone asked for, allowed or refused (arguments as typed, made storable)."""
    entry = AuditEntry(
        user_id=user_id,
        action=action,
        args=_storable_json(dict(args or {})),
        allowed=allowed,
        reason=storable_text(reason) if reason is not None else None,
        created_at=now or utcnow(),
    )
    session.add(entry)
    await session.flush()
    return entry


async def list_audit_entries(
    session: AsyncSession,
    *,
    limit: int = 50,
    user_id: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
) -> list[AuditEntry]:
    """Audit entries, newest first."""
    query = select(AuditEntry).order_by(AuditEntry.created_at.desc(), AuditEntry.id.desc()).limit(limit)
    if user_id is not None:
        query = query.where(AuditEntry.user_id == user_id)
    if action is not None:
        query = query.where(AuditEntry.action == action)
    if since is not None:
        query = query.where(AuditEntry.created_at >= since)
    return list((await session.scalars(query)).all())


# --- status --------------------------------------------------------------------------------------------


async def stats_since(session: AsyncSession, since: datetime) -> Stats:
    """Messages, predictions, corrections and confirmations since a time, and the pending backlog now."""
    feedback = await feedback_counts(session, since)
    messages = await _count(
        session, select(func.count()).select_from(Message).where(Message.received_at >= since)
    )
    predictions = await _count(
        session, select(func.count()).select_from(Prediction).where(Prediction.created_at >= since)
    )
    return Stats(
        since=since,
        messages=messages,
        predictions=predictions,
        corrections=feedback.corrections,
        confirmations=feedback.confirmations,
        pending=await count_pending(session),
    )


# ---- cards ---------------------------------------------------------------------------------------------
CARD_LEASE = timedelta(seconds=60)  # a replica that took a card and died: another posts it after this


async def queue_card(
    session: AsyncSession, message_id: int, *, urgent: bool, now: datetime | None = None
) -> Card:
    """The message's card, queued to be posted now (once: a card posted or queued already is kept)."""
    card = await ensure_card(session, message_id)
    if card.ts is None and card.due_at is None:
        card.urgent, card.due_at = urgent, now or utcnow()
    return card


async def ensure_card(session: AsyncSession, message_id: int) -> Card:
    """The message's card row, made (not queued: no card to post) when it has none yet: escalation state
    lives there in every delivery mode."""
    card = await get_card(session, message_id)
    if card is None:
        card = Card(message_id=message_id, urgent=False, due_at=None, attempts=0)
        session.add(card)
        await session.flush()
    return card


async def set_escalation_post(session: AsyncSession, message_id: int, channel_id: str, ts: str) -> None:
    await session.execute(
        update(Card)
        .where(Card.message_id == message_id)
        .values(escalation_channel_id=channel_id, escalation_ts=ts)
    )


async def get_card(session: AsyncSession, message_id: int) -> Card | None:
    return await session.scalar(select(Card).where(Card.message_id == message_id))


async def claim_due_card(
    session: AsyncSession, *, lease: timedelta = CARD_LEASE, now: datetime | None = None
) -> Card | None:
    """Take the card to post next (urgent first, then oldest), hidden from other replicas for ``lease``."""
    now = now or utcnow()
    due = (
        select(Card.id).where(Card.due_at <= now).order_by(Card.urgent.desc(), Card.due_at, Card.id).limit(1)
    )
    if _dialect(session) == "postgresql":
        due = due.with_for_update(skip_locked=True)
    stmt = (
        update(Card)
        .where(Card.id.in_(due.scalar_subquery()))
        .values(attempts=Card.attempts + 1, due_at=now + lease)
        .returning(Card)
    )
    return cast(
        Card | None,
        await session.scalar(
            stmt, execution_options={"synchronize_session": False, "populate_existing": True}
        ),
    )


async def card_posted(session: AsyncSession, card_id: int, *, channel_id: str, ts: str) -> None:
    await session.execute(
        update(Card).where(Card.id == card_id).values(channel_id=channel_id, ts=ts, due_at=None)
    )


async def retry_card(session: AsyncSession, card_id: int, *, at: datetime) -> None:
    await session.execute(update(Card).where(Card.id == card_id).values(due_at=at))


# ---- incidents -----------------------------------------------------------------------------------------
async def count_escalations(session: AsyncSession, topic: str, *, since: datetime) -> int:
    """Escalations of ``topic`` since ``since``."""
    return await _count(
        session,
        select(func.count(Card.id)).where(Card.escalation_topic == topic, Card.escalated_at >= since),
    )


async def mark_escalated(session: AsyncSession, message_id: int, *, topic: str | None, at: datetime) -> None:
    await session.execute(
        update(Card).where(Card.message_id == message_id).values(escalation_topic=topic, escalated_at=at)
    )


async def set_incident_post(session: AsyncSession, incident_id: int, channel_id: str, ts: str) -> None:
    await session.execute(
        update(Incident).where(Incident.id == incident_id).values(channel_id=channel_id, ts=ts)
    )


async def open_incident(session: AsyncSession, topic: str, *, since: datetime) -> Incident | None:
    """The incident of ``topic`` still going: open, and its last escalation came after ``since``."""
    return await session.scalar(
        select(Incident).where(Incident.open_topic == topic, Incident.last_escalation_at >= since)
    )


async def join_incident(session: AsyncSession, incident_id: int, *, at: datetime) -> None:
    """One more escalation under an incident (counted in SQL: replicas may add theirs at once)."""
    await session.execute(
        update(Incident)
        .where(Incident.id == incident_id)
        .values(last_escalation_at=at, escalations=Incident.escalations + 1)
    )


async def start_incident(
    session: AsyncSession, topic: str, *, at: datetime, since: datetime, escalations: int
) -> Incident:
    """A new open incident of ``topic``; the topic's earlier one, quiet since before ``since``, is closed
    (only then: one another replica just started stays open). Another replica starting one at the same
    time makes this flush or the commit fail with ``IntegrityError`` (the unique ``open_topic``): the
    caller then joins theirs."""
    await session.execute(
        update(Incident)
        .where(Incident.open_topic == topic, Incident.last_escalation_at < since)
        .values(open_topic=None)
    )
    incident = Incident(
        topic=topic, open_topic=topic, started_at=at, last_escalation_at=at, escalations=escalations
    )
    session.add(incident)
    await session.flush()
    return incident


# ---- the learning loop: live accuracy, review candidates, human labels ---------------------------------
@dataclass(frozen=True)
class Judged:
    """How one predicted label of one head fared with people: judged by someone, and right."""

    head: str
    predicted: str
    judged: int
    right: int


@dataclass(frozen=True)
class Candidate:
    """A recent classified message with its latest prediction and every person's current labels."""

    message: Message
    prediction: Prediction
    labels_by_user: dict[str, dict[str, str]]  # head -> user id -> that person's latest label
    labels: dict[str, str]  # head -> the latest label anyone gave (the message's label now)


def _latest_predictions() -> Any:
    """(id, message_id, created_at) of each message's newest prediction."""
    rank = (
        func.row_number()
        .over(
            partition_by=Prediction.message_id,
            order_by=(Prediction.created_at.desc(), Prediction.id.desc()),
        )
        .label("rank")
    )
    ranked = select(Prediction.id, Prediction.message_id, Prediction.created_at, rank).subquery("ranked")
    return (
        select(ranked.c.id, ranked.c.message_id, ranked.c.created_at)
        .where(ranked.c.rank == 1)
        .subquery("latest_prediction")
    )


async def live_accuracy(
    session: AsyncSession, *, since: datetime, until: datetime | None = None
) -> list[Judged]:
    """Per head and predicted label: messages a person labelled (confirmed or corrected) between ``since``
    and ``until``, and how many of them kept the model's latest label."""
    human = _labels_standing_at().subquery("human")
    latest = _latest_predictions()
    right = func.sum(case((human.c.label == PredictionHead.label, 1), else_=0))
    query = (
        select(PredictionHead.head, PredictionHead.label, func.count(), right)
        .select_from(human)
        .join(latest, latest.c.message_id == human.c.message_id)
        .join(
            PredictionHead,
            and_(PredictionHead.prediction_id == latest.c.id, PredictionHead.head == human.c.head),
        )
        .where(human.c.created_at >= since, human.c.created_at <= (until or utcnow()))
        .group_by(PredictionHead.head, PredictionHead.label)
    )
    return [
        Judged(head=head, predicted=label, judged=int(n), right=int(ok or 0))
        for head, label, n, ok in (await session.execute(query)).all()
    ]


async def review_candidates(session: AsyncSession, *, since: datetime, limit: int) -> list[Candidate]:
    """The newest ``limit`` classified messages received since ``since`` that still have their text, each
    with its latest prediction and each person's current labels (for the review queue)."""
    latest = _latest_predictions()
    rows = (
        await session.execute(
            select(Message, Prediction)
            .join(latest, latest.c.message_id == Message.id)
            .join(Prediction, Prediction.id == latest.c.id)
            .where(
                Message.received_at >= since,
                Message.state == MessageState.CLASSIFIED,
                Message.text.is_not(None),
                Message.deleted_at.is_(None),
                _not_forgotten(),
            )
            .order_by(Message.received_at.desc(), Message.id.desc())
            .limit(limit)
        )
    ).all()
    by_message: dict[int, dict[str, dict[str, str]]] = {message.id: {} for message, _ in rows}
    current: dict[int, dict[str, str]] = {message.id: {} for message, _ in rows}
    ids = sorted(by_message)
    for start in range(0, len(ids), ID_CHUNK):
        corrections = await session.scalars(
            select(Correction)
            .where(
                Correction.message_id.in_(ids[start : start + ID_CHUNK]), Correction.retracted_at.is_(None)
            )
            .order_by(Correction.created_at, Correction.id)
        )
        for c in corrections:  # oldest first: each person's latest label per head is the one left
            by_message[c.message_id].setdefault(c.head, {})[c.user_id] = c.new_label
            current[c.message_id][c.head] = c.new_label
    return [
        Candidate(message, prediction, by_message[message.id], current[message.id])
        for message, prediction in rows
    ]


async def recent_corrections(session: AsyncSession, user_id: str, *, limit: int = 10) -> list[Correction]:
    """Someone's labels, newest first, with their messages loaded."""
    query = (
        select(Correction)
        .where(Correction.user_id == user_id)
        .order_by(Correction.created_at.desc(), Correction.id.desc())
        .limit(limit)
        .options(selectinload(Correction.message))
    )
    return list((await session.scalars(query)).all())


async def count_labels_by(
    session: AsyncSession, head: str, *, since: datetime, until: datetime
) -> dict[str, int]:
    """Messages received in [since, until) by their label of ``head`` now (a person's over the model's)."""
    human = _labels_standing_at(heads=[head]).subquery("human")
    latest = _latest_predictions()
    label = func.coalesce(human.c.label, PredictionHead.label)
    query = (
        select(label, func.count())
        .select_from(Message)
        .join(latest, latest.c.message_id == Message.id)
        .join(PredictionHead, and_(PredictionHead.prediction_id == latest.c.id, PredictionHead.head == head))
        .outerjoin(human, human.c.message_id == Message.id)
        .where(Message.received_at >= since, Message.received_at < until)
        .group_by(label)
    )
    return {str(name): int(n) for name, n in (await session.execute(query)).all()}


async def claim_scheduled_post(
    session: AsyncSession, job: str, slot: datetime, *, now: datetime | None = None
) -> bool:
    """Whether this caller posts ``job`` for ``slot``: of several replicas exactly one gets ``True``
    (primary key + ON CONFLICT DO NOTHING, as ``record_event``)."""
    stmt = (
        _insert(session, ScheduledPost)
        .values(job=job, slot=slot, claimed_at=now or utcnow())
        .on_conflict_do_nothing(index_elements=["job", "slot"])
        .returning(ScheduledPost.job)
    )
    return (await session.execute(stmt)).first() is not None


async def count_escalated(session: AsyncSession, *, since: datetime, until: datetime) -> int:
    """Messages escalated in [since, until)."""
    return await _count(
        session,
        select(func.count(Card.id)).where(Card.escalated_at >= since, Card.escalated_at < until),
    )


@dataclass(frozen=True)
class LabelProfile:
    """How often one model version predicted one label of one head, and its summed confidence."""

    head: str
    label: str
    count: int
    confidence_sum: float


async def prediction_profile(
    session: AsyncSession, model_version: str, *, since: datetime, until: datetime
) -> list[LabelProfile]:
    """Per head and label: messages received in [since, until) whose latest prediction came from
    ``model_version`` and gave that label, with the confidences summed (for drift)."""
    latest = _latest_predictions()
    query = (
        select(PredictionHead.head, PredictionHead.label, func.count(), func.sum(PredictionHead.confidence))
        .select_from(Message)
        .join(latest, latest.c.message_id == Message.id)
        .join(Prediction, Prediction.id == latest.c.id)
        .join(PredictionHead, PredictionHead.prediction_id == latest.c.id)
        .where(
            Message.received_at >= since,
            Message.received_at < until,
            Prediction.model_version == model_version,
        )
        .group_by(PredictionHead.head, PredictionHead.label)
    )
    return [
        LabelProfile(head=head, label=label, count=int(n), confidence_sum=float(total or 0.0))
        for head, label, n, total in (await session.execute(query)).all()
    ]

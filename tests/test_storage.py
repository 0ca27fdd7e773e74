"""The storage layer on real databases: every database test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
from datetime import UTC, datetime, timedelta

import pytest
import typer
from sqlalchemy import event, func, select, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from typer.testing import CliRunner

from bot.storage import repository as repo
from bot.storage.cli import register
from bot.storage.database import (
    SQLITE_BUSY_TIMEOUT_MS,
    DatabaseConfigError,
    FirstInLinePool,
    create_db_engine,
    first_in_line,
    resolve_database_url,
    upgrade_database,
)
from bot.storage.models import (
    Correction,
    CorrectionKind,
    CorrectionSource,
    Message,
    MessageState,
    TrainingStatus,
    TrainingTrigger,
)
from bot.triage import StoreBatches
from classifier.results import HeadPrediction
from tests.support.waiting import eventually

Factory = async_sessionmaker[AsyncSession]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
REACTION = CorrectionSource.REACTION


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


async def store(
    factory: Factory,
    ts: str,
    *,
    user: str | None = "U1",
    text: str | None = "my invoice is wrong",
    received: datetime = T0,
    channel: str = "C1",
) -> Message:
    async with factory.begin() as session:
        message, _ = await repo.store_message(
            session, team_id="T1", channel_id=channel, ts=ts, user_id=user, text=text, now=received
        )
    return message


async def correct(
    factory: Factory,
    message_id: int,
    head: str,
    label: str,
    *,
    user: str = "U9",
    when: datetime = T0,
    kind: CorrectionKind = CorrectionKind.CORRECTION,
    reaction: str | None = None,
) -> Correction:
    async with factory.begin() as session:
        return await repo.add_correction(
            session,
            message_id,
            head,
            label,
            user_id=user,
            source=REACTION if reaction else CorrectionSource.BUTTON,
            kind=kind,
            reaction=reaction,
            now=when,
        )


# --- configuration -------------------------------------------------------------------------------------


def test_default_url_is_sqlite_in_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    url = resolve_database_url()
    assert url.drivername == "sqlite+aiosqlite"
    assert url.database == f"{tmp_path}/triage.db"


def test_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://bot:pw@db.example:5433/triage")
    url = resolve_database_url()
    assert (url.drivername, url.host, url.port, url.database) == (
        "postgresql+asyncpg",
        "db.example",
        5433,
        "triage",
    )
    # An explicit URL wins over the environment.
    assert resolve_database_url("sqlite:////tmp/x.db").drivername == "sqlite+aiosqlite"


def test_url_from_a_dotenv_file_as_the_bot_reads_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    """`triage db` and `triage up` migrate the database the bot then opens, whichever way it is configured."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    dotenv = "DATABASE_URL=postgres://bot:pw@db.example:5433/triage\n"
    (tmp_path / ".env").write_text(dotenv, encoding="utf-8")
    assert resolve_database_url().host == "db.example"


@pytest.mark.parametrize(
    "raw",
    [
        "postgresql://u:pw@h/db",
        "postgres://u:pw@h/db",
        "postgresql+asyncpg://u:pw@h/db",
    ],
)
def test_postgres_urls_use_asyncpg(raw: str) -> None:
    url = resolve_database_url(raw)
    assert url.drivername == "postgresql+asyncpg"
    assert (url.username, url.password, url.host, url.database) == ("u", "pw", "h", "db")


def test_sslmode_becomes_asyncpg_ssl() -> None:
    url = resolve_database_url("postgres://u:pw@h/db?sslmode=require")
    assert dict(url.query) == {"ssl": "require"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("mysql://u:s3cret@h/db", "unsupported database"),
        ("postgresql+psycopg2://u:s3cret@h/db", "asyncpg"),
        ("sqlite+pysqlite:///x.db", "aiosqlite"),
        ("sqlite+aiosqlite://", "in-memory"),
        ("sqlite+aiosqlite:///:memory:", "in-memory"),
        ("postgresql://u:s3cret@/db", "no host"),
        ("::not a url s3cret::", "cannot be parsed"),
    ],
)
def test_bad_urls_are_explained_without_the_password(raw: str, expected: str) -> None:
    with pytest.raises(DatabaseConfigError, match=expected) as caught:
        resolve_database_url(raw)
    assert "s3cret" not in str(caught.value)


async def test_sqlite_connections_use_wal_foreign_keys_and_busy_timeout(tmp_path: object) -> None:
    engine = create_db_engine(f"sqlite+aiosqlite:///{tmp_path}/sub/dir/t.db")  # parent folders are created
    try:
        async with engine.connect() as connection:
            pragmas = [
                (await connection.exec_driver_sql(f"PRAGMA {name}")).scalar()
                for name in ("journal_mode", "foreign_keys", "busy_timeout")
            ]
    finally:
        await engine.dispose()
    assert pragmas == ["wal", 1, SQLITE_BUSY_TIMEOUT_MS]


# --- Slack events --------------------------------------------------------------------------------------


async def test_event_ids_are_recognised_once(session_factory: Factory) -> None:
    async with session_factory.begin() as session:
        assert await repo.record_event(session, "Ev1", now=T0) is True
    async with session_factory.begin() as session:
        assert await repo.record_event(session, "Ev1", now=at(1)) is False
        assert await repo.record_event(session, "Ev2", now=at(60 * 30)) is True
    async with session_factory.begin() as session:
        assert await repo.delete_events_before(session, at(60)) == 1
    async with session_factory.begin() as session:
        assert await repo.record_event(session, "Ev2") is False


async def test_concurrent_deliveries_of_one_event(session_factory: Factory) -> None:
    async def deliver() -> bool:
        async with session_factory.begin() as session:
            return await repo.record_event(session, "EvRetried")

    results = await asyncio.gather(*(deliver() for _ in range(4)))
    assert sorted(results) == [False, False, False, True]


# --- messages ------------------------------------------------------------------------------------------


async def test_store_message_is_idempotent(session_factory: Factory) -> None:
    async with session_factory.begin() as session:
        first, created = await repo.store_message(
            session,
            team_id="T1",
            channel_id="C1",
            ts="1700000000.000100",
            thread_ts="1700000000.000001",
            user_id="U1",
            text="the app is down",
            received_at=T0 - timedelta(seconds=3),
            now=T0,
        )
    assert created
    assert (first.state, first.attempts, first.received_at) == (
        MessageState.PENDING,
        0,
        T0 - timedelta(seconds=3),
    )
    assert first.next_attempt_at == T0 + repo.DEFAULT_LEASE
    async with session_factory.begin() as session:
        again, created = await repo.store_message(
            session, team_id="T1", channel_id="C1", ts="1700000000.000100", user_id="U1", text="edited?"
        )
    assert not created
    assert again.id == first.id
    assert again.text == "the app is down"
    assert again.thread_ts == "1700000000.000001"


async def test_concurrent_inserts_of_one_message_make_one_row(session_factory: Factory) -> None:
    async def insert() -> tuple[int, bool]:
        async with session_factory.begin() as session:
            message, created = await repo.store_message(
                session, team_id="T1", channel_id="C1", ts="1.000001", user_id="U1", text="hello"
            )
            return message.id, created

    results = await asyncio.gather(insert(), insert())
    assert results[0][0] == results[1][0]
    assert sorted(created for _, created in results) == [False, True]
    async with session_factory() as session:
        assert await session.scalar(select(func.count()).select_from(Message)) == 1


def new(ts: str, event_id: str | None = None, *, user: str = "U1", channel: str = "C1") -> repo.NewMessage:
    return repo.NewMessage("T1", channel, ts, user, f"message {ts}", event_id=event_id)


async def test_a_batch_of_new_messages_stores_each_event_and_message_once(session_factory: Factory) -> None:
    async with session_factory.begin() as session:
        await repo.forget_user(session, "U0GONE", now=T0)
        before, _ = await repo.store_message(
            session, team_id="T1", channel_id="C1", ts="1.0", user_id="U1", text="stored one by one"
        )
        assert await repo.record_event(session, "EvOld")
    batch = [
        new("1.1", "Ev1"),
        new("1.2", "Ev2"),
        new("1.1", "Ev1"),  # Slack's retry, racing its original into the same batch
        new("1.3", "EvOld"),  # an event stored before
        new("1.0", "Ev3"),  # a message stored before, under another event id
        new("1.4"),  # no event id (a backfilled message)
        new("1.4"),
        new("1.5", "Ev5", user="U0GONE"),
    ]
    async with session_factory.begin() as session:
        stored = await repo.store_new_messages(session, batch, now=T0)
    assert [m.ts if m else None for m in stored] == ["1.1", "1.2", None, None, None, "1.4", None, "1.5"]
    assert stored[0] is not None
    assert (stored[0].state, stored[0].text) == (MessageState.PENDING, "message 1.1")
    assert stored[0].next_attempt_at == T0 + repo.DEFAULT_LEASE
    assert stored[7] is not None and stored[7].text is None  # a forgotten user's text is never stored
    async with session_factory.begin() as session:
        assert await repo.store_new_messages(session, batch) == [None] * len(batch)  # all delivered again
        assert await session.scalar(select(func.count()).select_from(Message)) == 5
        assert (await session.get(Message, before.id)) is not None


async def test_group_commit_stores_concurrent_events_in_one_transaction(
    engine: AsyncEngine, session_factory: Factory
) -> None:
    commits: list[int] = []
    event.listen(engine.sync_engine, "commit", lambda _: commits.append(1))
    batches = StoreBatches(session_factory)
    stored = await asyncio.gather(*(batches.store(new(f"2.{i}", f"Ev{i}")) for i in range(40)))
    assert sorted(m.ts for m in stored if m is not None) == sorted(f"2.{i}" for i in range(40))
    assert len(commits) == 1
    again = await asyncio.gather(*(batches.store(new(f"2.{i}", f"Ev{i}")) for i in range(3)))
    assert again == [None, None, None]


async def test_a_message_the_database_refuses_fails_only_its_own_event(session_factory: Factory) -> None:
    batches = StoreBatches(session_factory)
    refused = dataclasses.replace(new("3.2", "Ev2"), team_id=None)  # type: ignore[arg-type]  # NOT NULL
    results = await asyncio.gather(
        batches.store(new("3.1", "Ev1")),
        batches.store(refused),
        batches.store(new("3.3", "Ev3")),
        return_exceptions=True,
    )
    assert isinstance(results[1], IntegrityError)
    assert [m.ts for m in results if isinstance(m, Message)] == ["3.1", "3.3"]
    async with session_factory() as session:
        assert await session.scalar(select(func.count()).select_from(Message)) == 2
        assert await repo.record_event(session, "Ev2")  # its event id was not kept: Slack's retry is stored


async def test_first_in_line_sessions_get_the_next_free_connection(database_url: URL) -> None:
    await upgrade_database(database_url)
    engine = create_db_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=30)
    pool = engine.sync_engine.pool
    assert isinstance(pool, FirstInLinePool)
    sessions = async_sessionmaker(engine)
    order: list[str] = []

    async def use(name: str) -> None:
        async with sessions() as session:
            await session.connection()
            order.append(name)

    async def first(name: str) -> None:
        with first_in_line():
            await use(name)

    async def waiting(n: int) -> bool:
        return pool.waiting() == n

    try:
        async with sessions() as holder:
            await holder.connection()
            tasks = [asyncio.ensure_future(use(name)) for name in ("a", "b")]
            assert await eventually(lambda: waiting(2))
            gave_up = asyncio.ensure_future(asyncio.wait_for(first("gave up"), 0.01))
            with pytest.raises(TimeoutError):
                await gave_up
            tasks.append(asyncio.ensure_future(first("first")))
            assert await eventually(lambda: waiting(3))
        await asyncio.gather(*tasks)
        assert order == ["first", "a", "b"]
        await use("after")  # nothing was lost to the waiter that gave up
    finally:
        await engine.dispose()


async def test_message_lookup_by_ts_and_by_reply(session_factory: Factory) -> None:
    message = await store(session_factory, "1.1")
    await store(session_factory, "1.1", channel="C2")  # same ts, other channel: another message
    async with session_factory.begin() as session:
        await repo.set_reply(session, message.id, channel_id="C1", ts="1.2")
    async with session_factory() as session:
        found = await repo.get_message(session, "T1", "C1", "1.1")
        assert found is not None and found.id == message.id
        assert await repo.get_message(session, "T1", "C1", "9.9") is None
        by_reply = await repo.get_message_by_reply(session, "T1", "C1", "1.2")
        assert by_reply is not None and by_reply.id == message.id
        assert await repo.get_message_by_reply(session, "T2", "C1", "1.2") is None


# --- predictions ---------------------------------------------------------------------------------------


async def test_predictions_from_several_model_versions(session_factory: Factory) -> None:
    message = await store(session_factory, "2.1")
    # Head names are data: any schema works without a migration.
    heads_v1 = {
        "language": HeadPrediction("de", 0.7, {"de": 0.7, "en": 0.3}),
        "product": HeadPrediction("mobile", 0.55, {"mobile": 0.55, "web": 0.45}),
    }
    async with session_factory.begin() as session:
        await repo.add_prediction(session, message.id, "v1", heads_v1, latency_ms=12.5, now=at(1))
        await repo.add_prediction(
            session, message.id, "v2", {"language": HeadPrediction("en", 0.9, {"en": 0.9})}, now=at(2)
        )
    async with session_factory() as session:
        latest = await repo.latest_prediction(session, message.id)
        assert latest is not None and latest.model_version == "v2"
        assert latest.by_head()["language"].label == "en"
        v1 = await repo.latest_prediction(session, message.id, model_version="v1")
        assert v1 is not None and v1.latency_ms == 12.5
        assert {h: (p.label, p.confidence, p.scores) for h, p in v1.by_head().items()} == {
            "language": ("de", 0.7, {"de": 0.7, "en": 0.3}),
            "product": ("mobile", 0.55, {"mobile": 0.55, "web": 0.45}),
        }
    async with session_factory.begin() as session:
        with pytest.raises(ValueError, match="at least one head"):
            await repo.add_prediction(session, message.id, "v3", {})


# --- corrections and labels ----------------------------------------------------------------------------


async def test_two_peoples_corrections_are_kept_and_the_later_wins(session_factory: Factory) -> None:
    message = await store(session_factory, "3.1")
    await asyncio.gather(
        correct(session_factory, message.id, "topic", "bug", user="U2", when=at(2)),
        correct(session_factory, message.id, "topic", "billing", user="U3", when=at(1)),
    )
    async with session_factory() as session:
        assert await repo.standing_label(session, message.id, "topic") == "bug"
        assert await repo.standing_labels(session, message.id) == {"topic": "bug"}
        rows = (await session.scalars(select(Correction).order_by(Correction.created_at))).all()
        assert [(c.user_id, c.new_label) for c in rows] == [("U3", "billing"), ("U2", "bug")]


async def test_removed_reaction_retracts_its_correction(session_factory: Factory) -> None:
    message = await store(session_factory, "3.2")
    await correct(session_factory, message.id, "urgency", "high", user="U2", when=at(1), reaction="fire")
    await correct(
        session_factory, message.id, "urgency", "critical", user="U3", when=at(2), reaction="rotating_light"
    )
    await correct(session_factory, message.id, "topic", "outage", user="U3", when=at(2), reaction="boom")
    async with session_factory.begin() as session:
        # Only U3's rotating_light reaction: not U2's, not U3's other reaction.
        assert (
            await repo.retract_correction(session, message.id, user_id="U3", reaction="rotating_light") == 1
        )
        assert await repo.retract_correction(session, message.id, user_id="U2", reaction="boom") == 0
    async with session_factory() as session:
        assert await repo.standing_labels(session, message.id) == {"urgency": "high", "topic": "outage"}
    async with session_factory.begin() as session:
        assert await repo.retract_correction(session, message.id, user_id="U2", reaction="fire") == 1
        assert await repo.retract_correction(session, message.id, user_id="U2", reaction="fire") == 0
    async with session_factory() as session:
        assert await repo.standing_label(session, message.id, "urgency") is None


async def test_confirmations_are_labels_and_feedback(session_factory: Factory) -> None:
    message = await store(session_factory, "3.3")
    await correct(
        session_factory, message.id, "sentiment", "negative", when=at(1), kind=CorrectionKind.CONFIRMATION
    )
    await correct(session_factory, message.id, "topic", "bug", when=at(5))
    await correct(session_factory, message.id, "topic", "account", when=at(6), reaction="bust_in_silhouette")
    async with session_factory.begin() as session:
        await repo.retract_correction(session, message.id, user_id="U9", reaction="bust_in_silhouette")
    async with session_factory() as session:
        assert await repo.standing_labels(session, message.id) == {"sentiment": "negative", "topic": "bug"}
        counts = await repo.feedback_counts(session, T0)
        assert (counts.corrections, counts.confirmations, counts.total) == (1, 1, 2)  # retracted not counted
        assert (await repo.feedback_counts(session, at(2))).total == 1
        assert (await repo.feedback_counts(session, T0, until=at(2))).total == 1


# --- training export -----------------------------------------------------------------------------------


async def test_training_export_as_of_a_cutoff(session_factory: Factory) -> None:
    cutoff = at(100)
    labelled = await store(session_factory, "4.1", text="refund please")
    await correct(session_factory, labelled.id, "topic", "billing", when=at(10))
    await correct(session_factory, labelled.id, "topic", "account", when=at(20), user="U8")
    await correct(session_factory, labelled.id, "topic", "bug", when=at(200))  # after the cut-off
    await correct(
        session_factory, labelled.id, "urgency", "low", when=at(10), kind=CorrectionKind.CONFIRMATION
    )
    # Retracted before the cut-off: no label. Retracted after it: still a label as of the cut-off.
    retracted = await store(session_factory, "4.2", text="gone")
    await correct(session_factory, retracted.id, "topic", "bug", when=at(10), reaction="bug")
    async with session_factory.begin() as session:
        await repo.retract_correction(session, retracted.id, user_id="U9", reaction="bug", now=at(50))
    late_retraction = await store(session_factory, "4.3", text="still counts")
    await correct(session_factory, late_retraction.id, "topic", "how_to", when=at(10), reaction="question")
    async with session_factory.begin() as session:
        await repo.retract_correction(
            session, late_retraction.id, user_id="U9", reaction="question", now=at(150)
        )
    purged = await store(session_factory, "4.4", text="old text", received=T0 - timedelta(days=400))
    await correct(session_factory, purged.id, "topic", "bug", when=at(10))
    forgotten = await store(session_factory, "4.5", user="U666", text="private")
    await correct(session_factory, forgotten.id, "topic", "account", when=at(10))
    await store(session_factory, "4.6", text="nobody labelled me")
    async with session_factory.begin() as session:
        await repo.purge_message_texts(session, older_than=T0 - timedelta(days=365))
        await repo.forget_user(session, "U666")

    async with session_factory() as session:
        examples = await repo.export_training_set(session, until=cutoff)
        assert [(e.message_id, e.text, e.labels) for e in examples] == [
            (labelled.id, "refund please", {"topic": "account", "urgency": "low"}),
            (late_retraction.id, "still counts", {"topic": "how_to"}),
        ]
        only_urgency = await repo.export_training_set(session, until=cutoff, heads=["urgency"])
        assert [(e.message_id, e.labels) for e in only_urgency] == [(labelled.id, {"urgency": "low"})]
        later = await repo.export_training_set(session, until=at(300))
        assert [(e.message_id, e.labels) for e in later] == [
            (labelled.id, {"topic": "bug", "urgency": "low"})
        ]


# --- pending work --------------------------------------------------------------------------------------


async def test_pending_messages_are_claimed_retried_and_classified(session_factory: Factory) -> None:
    message = await store(session_factory, "5.1", received=T0)
    async with session_factory.begin() as session:
        assert await repo.claim_due_messages(session, now=at(1)) == []  # the receiver's lease still runs
    async with session_factory.begin() as session:
        claimed = await repo.claim_due_messages(session, now=at(3), lease=timedelta(minutes=5))
        assert [(m.id, m.attempts, m.next_attempt_at) for m in claimed] == [(message.id, 1, at(8))]
    async with session_factory.begin() as session:
        assert await repo.claim_due_messages(session, now=at(4)) == []  # leased to that worker
        retry_at = await repo.schedule_retry(session, message.id, error="classifier unreachable", now=at(4))
        assert retry_at == at(4) + repo.RETRY_BASE_DELAY * 2  # doubled after one claim
    async with session_factory.begin() as session:
        assert await repo.claim_due_messages(session, now=at(4.9)) == []
        assert [m.id for m in await repo.claim_due_messages(session, now=at(5))] == [message.id]
        assert await repo.count_pending(session) == 1
        await repo.mark_classified(session, message.id, now=at(5))
    async with session_factory() as session:
        done = await repo.get_message(session, "T1", "C1", "5.1")
        assert done is not None
        assert (done.state, done.next_attempt_at, done.last_error) == (MessageState.CLASSIFIED, None, None)
        assert done.classified_at == at(5)
        assert await repo.claim_due_messages(session, now=at(10_000)) == []
        assert await repo.count_pending(session) == 0


async def test_skipped_messages_with_text_are_requeued(session_factory: Factory) -> None:
    gave_up = await store(session_factory, "6.1")
    empty = await store(session_factory, "6.2", text="  ")
    forgotten = await store(session_factory, "6.3", text=None)
    answered = await store(session_factory, "6.4")
    async with session_factory.begin() as session:
        for message in (gave_up, empty, forgotten):
            await repo.mark_skipped(session, message.id, reason="retries exhausted (an older version)")
        await repo.mark_classified(session, answered.id)
        assert await repo.count_skipped(session) == 1
    async with session_factory.begin() as session:
        assert await repo.requeue_skipped(session, now=at(10)) == 1
    async with session_factory.begin() as session:
        assert [m.id for m in await repo.claim_due_messages(session, now=at(10))] == [gave_up.id]
        again = await session.get(Message, gave_up.id)
        assert again is not None and (again.attempts, again.last_error) == (1, None)
        assert await repo.count_skipped(session) == 0


async def test_retries_never_give_up_and_the_delay_is_capped(session_factory: Factory) -> None:
    """A classifier outage of any length only delays the answer: 50 failed attempts, still pending."""
    message = await store(session_factory, "5.2", received=T0)
    now = T0
    cap = timedelta(minutes=5)
    for attempt in range(1, 51):
        now += timedelta(days=1)
        async with session_factory.begin() as session:
            assert [m.attempts for m in await repo.claim_due_messages(session, now=now)] == [attempt]
            retry = await repo.schedule_retry(session, message.id, error="boom", now=now, max_delay=cap)
        assert retry == now + min(repo.RETRY_BASE_DELAY * 2 ** min(attempt, 10), cap)
    async with session_factory() as session:
        waiting = await repo.get_message(session, "T1", "C1", "5.2")
        assert waiting is not None and (waiting.state, waiting.last_error) == (MessageState.PENDING, "boom")
        assert await repo.backlog(session) == repo.Backlog(waiting=1, failed=1, oldest=T0)
    async with session_factory.begin() as session:
        other = await store(session_factory, "5.3")
        await repo.mark_skipped(session, other.id, reason="bot message")
        for missing in (
            repo.schedule_retry(session, 10**9, error="x"),
            repo.mark_classified(session, 10**9),
            repo.mark_skipped(session, 10**9),
            repo.set_reply(session, 10**9, channel_id="C1", ts="1.0"),
        ):
            with pytest.raises(LookupError):
                await missing


async def test_concurrent_workers_claim_disjoint_messages(session_factory: Factory) -> None:
    ids = {(await store(session_factory, f"6.{i}", received=T0)).id for i in range(12)}

    async def worker() -> list[int]:
        async with session_factory.begin() as session:
            claimed = await repo.claim_due_messages(session, limit=8, now=at(60))
            await asyncio.sleep(0.05)  # hold the claim open while the other worker runs
            return [m.id for m in claimed]

    first, second = await asyncio.gather(worker(), worker())
    assert not set(first) & set(second)
    assert len(first) + len(second) == 12 or {len(first), len(second)} == {8, 0}
    assert set(first) | set(second) <= ids


# --- training runs, audit log ----------------------------------------------------------


async def test_training_runs(session_factory: Factory) -> None:
    async with session_factory.begin() as session:
        assert await repo.latest_training_run(session) is None
        old = await repo.start_training_run(session, trigger=TrainingTrigger.SCHEDULE, now=at(1))
        run = await repo.start_training_run(
            session, trigger=TrainingTrigger.COMMAND, requested_by="U1", now=at(60 * 24)
        )
    async with session_factory.begin() as session:
        latest = await repo.latest_training_run(session)
        assert latest is not None and (latest.id, latest.status) == (run.id, TrainingStatus.RUNNING)
        finished = await repo.finish_training_run(
            session,
            run.id,
            status=TrainingStatus.PROMOTED,
            train_examples=900,
            eval_examples=100,
            candidate_metrics={"macro_f1": 0.81},
            incumbent_metrics={"macro_f1": 0.78},
            candidate_version="v7",
            now=at(60 * 24 + 30),
        )
        assert finished.finished_at == at(60 * 24 + 30)
        with pytest.raises(ValueError, match="already finished"):
            await repo.finish_training_run(session, run.id, status=TrainingStatus.FAILED)
        with pytest.raises(ValueError, match="final status"):
            await repo.finish_training_run(session, old.id, status=TrainingStatus.RUNNING)
        with pytest.raises(LookupError):
            await repo.finish_training_run(session, 10**9, status=TrainingStatus.FAILED)
        assert await repo.fail_abandoned_training_runs(session, started_before=at(60), now=at(61)) == 1
    async with session_factory() as session:
        promoted = await repo.latest_training_run(session, status=TrainingStatus.PROMOTED)
        assert promoted is not None
        assert (promoted.candidate_version, promoted.train_examples, promoted.candidate_metrics) == (
            "v7",
            900,
            {"macro_f1": 0.81},
        )
        failed = await repo.latest_training_run(
            session, status=[TrainingStatus.FAILED, TrainingStatus.REJECTED]
        )
        assert failed is not None and (failed.id, failed.error) == (old.id, "abandoned: never finished")
        assert [r.id for r in await repo.list_training_runs(session)] == [run.id, old.id]


async def test_audit_log(session_factory: Factory) -> None:
    async with session_factory.begin() as session:
        await repo.add_audit_entry(session, user_id="U1", action="retrain", allowed=True, now=at(1))
        await repo.add_audit_entry(
            session,
            user_id="U2",
            action="promote",
            args={"version": "v3"},
            allowed=False,
            reason="not an admin",
            now=at(2),
        )
    async with session_factory() as session:
        entries = await repo.list_audit_entries(session)
        assert [(e.user_id, e.action, e.args, e.allowed, e.reason) for e in entries] == [
            ("U2", "promote", {"version": "v3"}, False, "not an admin"),
            ("U1", "retrain", {}, True, None),
        ]
        assert [e.user_id for e in await repo.list_audit_entries(session, user_id="U1")] == ["U1"]
        assert [e.action for e in await repo.list_audit_entries(session, action="promote")] == ["promote"]
        assert len(await repo.list_audit_entries(session, since=at(1.5))) == 1
        assert len(await repo.list_audit_entries(session, limit=1)) == 1


async def test_stats_since(session_factory: Factory) -> None:
    old = await store(session_factory, "7.1", received=T0 - timedelta(days=2))
    new = await store(session_factory, "7.2", received=T0)
    async with session_factory.begin() as session:
        head = {"topic": HeadPrediction("bug", 0.9, {"bug": 0.9})}
        await repo.add_prediction(session, old.id, "v1", head, now=T0 - timedelta(days=2))
        await repo.add_prediction(session, new.id, "v1", head, now=at(1))
        await repo.mark_classified(session, new.id)
    await correct(session_factory, new.id, "topic", "bug", when=at(2), kind=CorrectionKind.CONFIRMATION)
    await correct(session_factory, old.id, "topic", "outage", when=at(3))
    async with session_factory() as session:
        stats = await repo.stats_since(session, T0 - timedelta(hours=1))
    assert (stats.messages, stats.predictions, stats.corrections, stats.confirmations, stats.pending) == (
        1,
        1,
        1,
        1,
        1,
    )


# --- retention and forgetting --------------------------------------------------------------------------


async def test_retention_removes_texts_but_keeps_labels(session_factory: Factory) -> None:
    old = await store(session_factory, "8.1", text="old", received=T0 - timedelta(days=40))
    new = await store(session_factory, "8.2", text="new", received=T0 - timedelta(days=10))
    await correct(session_factory, old.id, "topic", "bug", when=T0 - timedelta(days=39))
    cutoff = repo.retention_cutoff(30, now=T0)
    async with session_factory.begin() as session:
        assert await repo.count_purgeable_texts(session, older_than=cutoff) == 1
        assert await repo.purge_message_texts(session, older_than=cutoff, now=T0) == 1
        assert await repo.purge_message_texts(session, older_than=cutoff, now=T0) == 0
    async with session_factory() as session:
        purged = await repo.get_message(session, "T1", "C1", "8.1")
        kept = await repo.get_message(session, "T1", "C1", "8.2")
        assert purged is not None and (purged.text, purged.text_removed_at) == (None, T0)
        assert kept is not None and kept.text == "new"
        assert await repo.standing_labels(session, old.id) == {"topic": "bug"}
        assert new.id != old.id
    with pytest.raises(ValueError):
        repo.retention_cutoff(0)


async def test_forget_user(session_factory: Factory) -> None:
    mine = await store(session_factory, "9.1", user="U5", text="my address is ...")
    theirs = await store(session_factory, "9.2", user="U6", text="unrelated")
    await correct(session_factory, mine.id, "topic", "account", when=at(1))
    async with session_factory.begin() as session:
        assert not await repo.is_forgotten(session, "U5")
        assert await repo.forget_user(session, "U5", requested_by="U1", now=at(2)) == 1
        assert await repo.forget_user(session, "U5") == 0  # idempotent
        assert await repo.is_forgotten(session, "U5")
    later = await store(session_factory, "9.3", user="U5", text="another secret")
    async with session_factory() as session:
        assert later.text is None and later.text_removed_at is not None
        forgotten = await repo.get_message(session, "T1", "C1", "9.1")
        assert forgotten is not None and forgotten.text is None
        other = await repo.get_message(session, "T1", "C1", "9.2")
        assert other is not None and other.text == "unrelated" and other.id == theirs.id
        assert await repo.standing_labels(session, mine.id) == {"topic": "account"}
        assert await repo.export_training_set(session, until=at(10)) == []
    # A text that slipped in anyway (e.g. stored concurrently with the forgetting) is caught by purge.
    async with session_factory.begin() as session:
        await session.execute(text("UPDATE messages SET text = 'leaked' WHERE ts = '9.3'"))
        assert await repo.purge_message_texts(session, older_than=T0 - timedelta(days=999)) == 1


# --- command line --------------------------------------------------------------------------------------


def test_cli(database_url: URL) -> None:
    app = typer.Typer()
    data = typer.Typer()
    register(app, data_app=data)
    app.add_typer(data, name="data")
    runner = CliRunner()
    url = ["--database-url", database_url.render_as_string(hide_password=False)]

    result = runner.invoke(app, ["db", "current", "--check", *url])
    assert result.exit_code == 1, result.output
    assert "run `triage db upgrade`" in result.output
    result = runner.invoke(app, ["data", "forget", "--user", "U123", "--yes", *url])
    assert result.exit_code == 1
    assert "the code needs" in result.output

    result = runner.invoke(app, ["db", "upgrade", *url])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["db", "current", "--check", *url])
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output

    result = runner.invoke(app, ["data", "forget", "--user", "u123", "--yes", *url])
    assert result.exit_code == 0, result.output
    assert "forgot U123" in result.output
    result = runner.invoke(app, ["data", "forget", "--user", "not-a-user", "--yes", *url])
    assert result.exit_code == 2
    result = runner.invoke(app, ["data", "forget", "--user", "U123", *url], input="n\n")
    assert result.exit_code == 1  # declined

    result = runner.invoke(app, ["data", "purge", "--days", "30", "--dry-run", *url])
    assert result.exit_code == 0, result.output
    assert "would remove 0" in result.output
    result = runner.invoke(app, ["data", "purge", *url], env={"TRIAGE_RETENTION_DAYS": "30"})
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "purge", *url], env={"TRIAGE_RETENTION_DAYS": ""})
    assert result.exit_code == 2

    result = runner.invoke(app, ["db", "current", "--database-url", "mysql://u:s3cret@h/db"])
    assert result.exit_code == 2
    assert "s3cret" not in result.output


async def test_cli_actions_are_audited(engine: AsyncEngine, database_url: URL) -> None:
    app = typer.Typer()
    data = typer.Typer()
    register(app, data_app=data)
    app.add_typer(data, name="data")
    url = database_url.render_as_string(hide_password=False)
    # The command runs its own event loop, so it goes to a thread.
    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["data", "forget", "-u", "W42", "-y", "--database-url", url]
    )
    assert result.exit_code == 0, result.output
    async with AsyncSession(engine) as session:
        entries = await repo.list_audit_entries(session, action="data.forget")
        assert [(e.args, e.allowed) for e in entries] == [({"user": "W42"}, True)]
        assert entries[0].user_id.startswith("cli:")
        assert await repo.is_forgotten(session, "W42")


async def test_messages_retry_command_queues_skipped_messages(
    engine: AsyncEngine, session_factory: Factory, database_url: URL
) -> None:
    app = typer.Typer()
    register(app)
    skipped = await store(session_factory, "7.1")
    async with session_factory.begin() as session:
        await repo.mark_skipped(session, skipped.id, reason="classifier: gave up after 10 attempts")
    url = ["--database-url", database_url.render_as_string(hide_password=False)]
    dry = await asyncio.to_thread(CliRunner().invoke, app, ["messages", "retry", "--dry-run", *url])
    assert dry.exit_code == 0 and "would queue 1 skipped message(s)" in dry.output, dry.output
    result = await asyncio.to_thread(CliRunner().invoke, app, ["messages", "retry", *url])
    assert result.exit_code == 0 and "queued 1 skipped message(s)" in result.output, result.output
    async with session_factory() as session:
        again = await session.get(Message, skipped.id)
        assert again is not None and again.state == MessageState.PENDING
        [entry] = await repo.list_audit_entries(session, action="messages.retry")
        assert entry.args == {"queued": 1}

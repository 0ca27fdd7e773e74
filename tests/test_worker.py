"""`triage worker`: queued training runs claimed from PostgreSQL, progress relayed by the bot, and a worker
killed mid-run; on SQLite (and with no worker up) the bot's own child process runs them as before."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from typer.testing import CliRunner

from bot.cli import app
from bot.retrain import Acceptance, Retrainer, RunOptions, run_in_progress
from bot.run_queue import worker_present
from bot.settings import SettingsError, load_worker_settings
from bot.storage import repository as repo
from bot.storage.database import create_db_engine, create_session_factory, upgrade_database
from bot.storage.models import TrainingRun, TrainingRunEvent, TrainingStatus, TrainingTrigger
from classifier.model import resolve_device
from classifier.promotion import Gate
from classifier.registry import Registry
from tests.support.model_fixtures import learnable_rows
from tests.test_retrain import _base_version, _store_feedback

POSTGRES_ONLY = pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])
SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"])

T = TypeVar("T")
WORKER = f"test-worker ({resolve_device('auto').type})"  # the name the tests give it, and its device
Db = tuple[AsyncEngine, async_sessionmaker[AsyncSession]]


@pytest.fixture
async def db(database_url: URL) -> AsyncIterator[Db]:
    await upgrade_database(database_url)
    engine = create_db_engine(database_url)
    yield engine, create_session_factory(engine)
    await engine.dispose()


class Slack:
    """The bot's ``post`` callable: records (channel, text, thread) and can wait for a text."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, str, str | None]] = []
        self._changed = asyncio.Condition()

    async def post(self, channel: str, text: str, thread_ts: str | None) -> str | None:
        self.posts.append((channel, text, thread_ts))
        async with self._changed:
            self._changed.notify_all()
        return f"1700000000.{len(self.posts):06d}"

    async def wait_for(self, needle: str) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: any(needle in text for _, text, _ in self.posts))

    def texts(self, channel: str) -> list[str]:
        return [text for c, text, _ in self.posts if c == channel]


@dataclass
class Worker:
    """A ``python -m bot.worker`` process and what it logged."""

    process: asyncio.subprocess.Process
    log: list[str] = field(default_factory=list)
    drain: asyncio.Future[None] | None = None

    async def within(self, seconds: float, waiting: Awaitable[T]) -> T:
        """``waiting``'s result, or a failure that shows the worker's log."""
        try:
            return await asyncio.wait_for(waiting, seconds)
        except TimeoutError:
            pytest.fail(f"not done within {seconds} s; the worker logged:\n" + "".join(self.log[-40:]))

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), timeout=60)
        if self.drain is not None:
            await self.drain
        return code


async def _start_worker(data_dir: Path, database_url: URL) -> Worker:
    """``python -m bot.worker`` as compose runs it (only DATABASE_URL and the data directory), once it says
    it is waiting for runs (it holds the presence lock by then)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "CLASSIFIER_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.worker",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={
            **env,
            "DATABASE_URL": database_url.render_as_string(hide_password=False),
            "TRIAGE_DATA_DIR": str(data_dir),
            "TRIAGE_WORKER_POLL_S": "0.1",
            "TRIAGE_WORKER_NAME": "test-worker",
        },
    )
    worker = Worker(process)
    assert process.stderr is not None
    async with asyncio.timeout(300):  # importing torch on a busy 2-core machine
        while not worker.log or "waiting for training runs" not in worker.log[-1]:
            line = await process.stderr.readline()
            assert line, "the worker exited: " + "".join(worker.log)
            worker.log.append(line.decode(errors="replace"))

    async def drain(stream: asyncio.StreamReader) -> None:  # a full pipe would stall the worker
        async for line in stream:
            worker.log.append(line.decode(errors="replace"))

    worker.drain = asyncio.ensure_future(drain(process.stderr))
    return worker


async def _runs(sessions: async_sessionmaker[AsyncSession]) -> list[TrainingRun]:
    async with sessions() as session:
        return list((await session.scalars(select(TrainingRun).order_by(TrainingRun.id))).all())


def test_worker_settings_need_postgresql(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="DATABASE_URL: must be a postgresql:// URL"):
        load_worker_settings(database_url="sqlite+aiosqlite:////tmp/triage.db")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(SettingsError, match="DATABASE_URL: is required"):
        load_worker_settings(_env_file=None)
    settings = load_worker_settings(database_url="postgresql://triage@db/triage", triage_worker_poll_s=0.5)
    assert settings.triage_worker_poll_s == 0.5
    with pytest.raises(SettingsError, match="TRIAGE_WORKER_POLL_S"):
        load_worker_settings(database_url="postgresql://triage@db/triage", triage_worker_poll_s=0)


def test_triage_worker_refuses_sqlite_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "sqlite+aiosqlite:////tmp/triage.db")
    result = CliRunner().invoke(app, ["worker"])
    assert result.exit_code == 2
    assert "error: DATABASE_URL: must be a postgresql:// URL" in result.output


def test_run_options_travel_as_json_and_bad_ones_are_refused() -> None:
    options = RunOptions(
        gate=Gate(tolerance=0.02), acceptance=Acceptance(after_hours=1, max_rows=5), epochs=3
    )
    assert RunOptions.from_json(options.to_json()) == options
    assert RunOptions.from_json(None) == RunOptions()
    with pytest.raises(ValueError, match="options are not valid"):
        RunOptions.from_json({"gate": {"tolerance": "a lot"}})


async def test_enqueue_and_claim_the_oldest_run(db: Db) -> None:
    """Both databases store a queued run (the migrated status check allows 'queued'); a claim takes the
    oldest one, once."""
    _, sessions = db
    async with sessions.begin() as session:
        first = await repo.enqueue_training_run(
            session, trigger=TrainingTrigger.COMMAND, options={"epochs": 1}, requested_by="U0ADMIN"
        )
        second = await repo.enqueue_training_run(session, trigger=TrainingTrigger.SCHEDULE, options={})
    async with sessions.begin() as session:
        claimed = await repo.claim_training_run(session, worker="w1 (cpu)")
    assert claimed is not None and claimed.id == first.id and claimed.status == TrainingStatus.RUNNING
    assert claimed.worker == "w1 (cpu)" and claimed.options == {"epochs": 1}
    assert claimed.queued_at is not None and claimed.started_at >= claimed.queued_at
    async with sessions.begin() as session:
        claimed = await repo.claim_training_run(session, worker="w2 (cpu)")
        assert claimed is not None and claimed.id == second.id
        assert await repo.claim_training_run(session, worker="w2 (cpu)") is None


@POSTGRES_ONLY
async def test_a_run_being_claimed_is_skipped_not_claimed_twice(db: Db) -> None:
    _, sessions = db
    async with sessions.begin() as session:
        first = await repo.enqueue_training_run(session, trigger=TrainingTrigger.CLI, options={})
        second = await repo.enqueue_training_run(session, trigger=TrainingTrigger.CLI, options={})
    async with sessions.begin() as one:
        got_one = await repo.claim_training_run(one, worker="a")
        async with sessions.begin() as two:  # while the first claim's transaction is open
            # a claim that waited for the first one's row lock would wait here for ever
            got_two = await asyncio.wait_for(repo.claim_training_run(two, worker="b"), timeout=10)
    assert got_one is not None and got_two is not None
    assert (got_one.id, got_two.id) == (first.id, second.id)


@POSTGRES_ONLY
async def test_worker_runs_a_queued_run_and_the_bot_posts_its_progress(
    tiny_bert: Path, data_dir: Path, db: Db, database_url: URL
) -> None:
    """enqueue (the bot's /triage retrain) → claim (the worker process) → progress rows → promotion, with
    the progress and the summary posted by the bot as for a run in its own child process."""
    engine, sessions = db
    registry = Registry(data_dir / "models")
    _base_version(registry, tiny_bert, steps=1)  # barely trained: the feedback makes a better one
    await _store_feedback(sessions, learnable_rows(300, seed=5))
    assert not await worker_present(engine)
    worker = await _start_worker(data_dir, database_url)
    try:
        assert await worker_present(engine)
        for _ in range(100):  # an idle worker (polling every 0.1 s) never holds the run lock: no false "busy"
            assert not await run_in_progress(engine)
            await asyncio.sleep(0.01)
        slack = Slack()
        bot = Retrainer(
            sessions,
            engine,
            post=slack.post,
            summary_channel="C0SUMMARY",
            options=RunOptions(epochs=4),
            poll_s=0.05,
        )
        answer = await bot.request(requested_by="U0ADMIN", notify_channel="C0ASK")
        assert answer == "Retraining queued for the worker; progress follows in <#C0ASK>."
        assert "already" in (await bot.busy_message() or "")  # queued or running: not twice
        assert bot.relay is not None
        await worker.within(600, bot.relay)
    finally:
        code = await worker.stop()  # SIGTERM: stops claiming; exits once idle
    assert code == 0, "".join(worker.log)
    assert bot.process is None  # the bot trained nothing itself
    asked = slack.texts("C0ASK")
    assert asked[0].startswith(":hourglass_flowing_sand: Retraining from v1:")
    assert any(text.startswith("epoch 1/4: validation macro-F1") for text in asked)
    assert asked[-1].startswith(":rocket: *v2* promoted (was v1)")
    assert slack.texts("C0SUMMARY") == [asked[-1]]
    progress = [(t, thread) for c, t, thread in slack.posts if c == "C0ASK"][1:-1]
    assert progress and all(thread == "1700000000.000001" for _, thread in progress)  # one thread
    assert registry.active_name() == "v2"
    (run,) = await _runs(sessions)
    assert run.status == TrainingStatus.PROMOTED and run.candidate_version == "v2"
    assert run.requested_by == "U0ADMIN" and run.notify_channel == "C0ASK"
    assert run.worker == WORKER and run.options is not None and run.options["epochs"] == 4
    async with sessions() as session:
        events = [e.event["event"] for e in await repo.training_run_events(session, run.id)]
    assert events[0] == "dataset" and "epoch" in events and events[-1] == "done"
    assert not await worker_present(engine)  # SIGTERM let go of the presence lock


@POSTGRES_ONLY
async def test_killed_worker_fails_its_run_and_the_next_run_proceeds(
    tiny_bert: Path, data_dir: Path, db: Db, database_url: URL
) -> None:
    engine, sessions = db
    registry = Registry(data_dir / "models")
    _base_version(registry, tiny_bert, steps=1)
    await _store_feedback(sessions, learnable_rows(800, seed=5))  # enough work to be killed mid-training
    worker = await _start_worker(data_dir, database_url)
    slack = Slack()
    bot = Retrainer(sessions, engine, post=slack.post, options=RunOptions(epochs=50), poll_s=0.05)
    await bot.request(requested_by="U0ADMIN", notify_channel="C0ASK")
    # the worker claimed it, holds the run lock, trains
    await worker.within(300, slack.wait_for("Retraining from v1"))
    assert await worker.stop(signal.SIGKILL) == -signal.SIGKILL
    assert bot.relay is not None
    await asyncio.wait_for(bot.relay, timeout=60)  # the bot notices at once and fails the run
    assert slack.texts("C0ASK")[-1].startswith(":x: Retraining failed: abandoned")
    assert registry.active_name() == "v1" and registry.names() == ["v1"]
    (killed,) = await _runs(sessions)
    assert killed.status == TrainingStatus.FAILED and "abandoned" in (killed.error or "")
    assert killed.finished_at is not None
    assert await bot.busy_message() is None

    # the next run, from `triage retrain` while a (new) worker is up: queued, run there, followed here
    worker = await _start_worker(data_dir, database_url)
    try:
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot.cli",
            "retrain",
            "--epochs",
            "1",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={
                **os.environ,
                "DATABASE_URL": database_url.render_as_string(hide_password=False),
                "TRIAGE_DATA_DIR": str(data_dir),
            },
        )
        out, err = await worker.within(600, cli.communicate())
    finally:
        await worker.stop()
    assert cli.returncode == 0, err.decode() + "".join(worker.log)
    assert "Queued as run 2 for the worker" in err.decode()
    assert "epoch 1/1: validation macro-F1" in out.decode()
    killed, proceeded = await _runs(sessions)
    assert proceeded.status in (TrainingStatus.PROMOTED, TrainingStatus.REJECTED), proceeded.error
    assert proceeded.trigger == TrainingTrigger.CLI and proceeded.worker == WORKER
    assert proceeded.candidate_version == "v2" and registry.get("v2").status in ("active", "rejected")
    assert not list(registry.root.glob(".staging-*"))  # the killed run's leftovers are gone
    async with sessions() as session:
        last = (await session.scalars(select(TrainingRunEvent).order_by(TrainingRunEvent.id.desc()))).first()
    assert last is not None and last.run_id == proceeded.id and last.event["event"] == "done"


@SQLITE_ONLY
async def test_without_a_worker_the_bot_runs_the_retrain_itself(
    tiny_bert: Path, data_dir: Path, db: Db
) -> None:
    """SQLite (no worker can run there): `/triage retrain` starts the bot's child process, and its JSON
    progress lines are posted as before."""
    engine, sessions = db
    registry = Registry(data_dir / "models")
    _base_version(registry, tiny_bert, steps=1)
    await _store_feedback(sessions, learnable_rows(60, seed=5))
    assert not await worker_present(engine)
    slack = Slack()
    bot = Retrainer(
        sessions, engine, post=slack.post, summary_channel="C0SUMMARY", options=RunOptions(epochs=1)
    )
    assert await bot.request(requested_by="U0ADMIN", notify_channel="C0ASK") == (
        "Retraining started; progress follows in <#C0ASK>."
    )
    assert bot.process is not None and bot.relay is not None
    await asyncio.wait_for(bot.relay, timeout=300)
    asked = slack.texts("C0ASK")
    assert asked[0].startswith(":hourglass_flowing_sand: Retraining from v1:")
    assert asked[1].startswith("epoch 1/1: validation macro-F1")
    assert asked[-1].startswith((":rocket: *v2* promoted", ":no_entry: *v2* rejected"))
    assert slack.texts("C0SUMMARY") == [asked[-1]]
    (run,) = await _runs(sessions)
    assert run.status in (TrainingStatus.PROMOTED, TrainingStatus.REJECTED) and run.worker is None

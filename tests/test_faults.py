"""Faults injected into the bot's own process (issue #16's fast cases; ``bench/faults.py`` measures them).

The bot runs as a real ``triage bot`` subprocess against the Slack stand-in: a ``kill -9`` under load must
lose and duplicate nothing once the bot is started again on the same port and Slack has redelivered what
the dead bot never acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import func, select
from sqlalchemy.engine import URL

from bot.storage.database import create_db_engine, create_session_factory, upgrade_database
from bot.storage.models import Message, MessageState
from classifier.registry import Registry
from tests.support.slack_standin import ApiCall, SlackStandIn
from tests.support.tiny_model import make_tiny_version
from tests.support.waiting import eventually
from tests.test_bot import CUSTOMER, _replies_per_thread

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = 120
RATE = 30.0  # messages per second
KILL_AFTER = MESSAGES // 3  # messages sent before the kill, with replies already coming
HELD_AFTER = MESSAGES // 2  # the rest are sent once the bot is dead: Slack finds nobody there
# The bot posts about one message a second per channel (Slack's limit): spread over channels, the
# replies take seconds, not two minutes
CHANNELS = [f"C0CUST{i:03d}" for i in range(24)]
REDELIVERY_S = 0.5  # Slack redelivers at once, then after 1 and 5 minutes: compressed here
# A reply is in Slack this long before the bot hears so: a kill then leaves it posted but unrecorded
POST_ANSWER_S = 0.3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BotSubprocess:
    """``python -m bot.cli bot`` on a fixed port (a restarted bot answers where Slack delivers)."""

    def __init__(self, env: dict[str, str], port: int, log_dir: Path) -> None:
        self.env, self.port, self.log_dir = env, port, log_dir
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        log = (self.log_dir / f"bot-{self.starts}.log").open("wb")
        with log:  # the child keeps its own descriptor
            self.process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "bot.cli", "bot"),
                env=self.env,
                cwd=self.log_dir,  # no .env of the checkout's
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        assert await eventually(self._healthy, within_s=90), f"the bot did not start:\n{self.logs()}"

    async def _healthy(self) -> bool:
        assert self.process is not None
        assert self.process.returncode is None, f"the bot exited:\n{self.logs()}"
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{self.port}/healthz", timeout=aiohttp.ClientTimeout(2)) as r,
            ):
                return r.status == 200
        return False

    async def kill(self) -> None:
        """SIGKILL: nothing is flushed, closed or finished."""
        assert self.process is not None
        self.process.kill()  # our own child, by its handle
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()  # our own child, by its handle
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()

    def logs(self, last: int = 40) -> str:
        lines = []
        for path in sorted(self.log_dir.glob("bot-*.log")):
            tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-last:]
            lines += [f"--- {path.name}", *tail]
        return "\n".join(lines)


class SlowAnswers:
    """``method`` done at once in the stand-in, its answer sent ``seconds`` later; ``pending``: how many
    are done in Slack with their answers still on the way."""

    def __init__(self, slack: SlackStandIn, method: str, seconds: float) -> None:
        self.done = slack.register_method(method, self.answer)
        assert self.done is not None
        self.seconds = seconds
        self.pending = 0

    async def answer(self, call: ApiCall) -> Mapping[str, Any]:
        assert self.done is not None
        answer = self.done(call)
        answer = await answer if inspect.isawaitable(answer) else answer
        self.pending += 1
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.pending -= 1
        return answer

    async def any_pending(self) -> bool:
        return self.pending > 0


@contextlib.asynccontextmanager
async def bot_subprocess(
    slack: SlackStandIn, database_url: URL, tmp_path: Path
) -> AsyncIterator[BotSubprocess]:
    port = _free_port()
    slack.bot_url = f"http://127.0.0.1:{port}/slack/events"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "SLACK_BOT_TOKEN": slack.bot_token,
        "SLACK_SIGNING_SECRET": slack.signing_secret,
        "SLACK_API_URL": slack.api_url,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DATABASE_URL": database_url.render_as_string(hide_password=False),
        "TRIAGE_CHANNELS": ",".join(CHANNELS),
        "TRIAGE_EMBEDDED_CLASSIFIER": "thread",  # no classifier child to outlive a killed bot
        "TRIAGE_PENDING_INTERVAL_S": "0.2",
        "TRIAGE_RETRY_BASE_S": "0.2",
        # what the killed bot had leased waits this long for the new one (120 s by default)
        "TRIAGE_LEASE_S": "3",
    }
    bot = BotSubprocess(env, port, tmp_path)
    try:
        await bot.start()
        yield bot
    finally:
        await bot.stop()


async def test_a_bot_killed_under_load_and_restarted_loses_and_duplicates_nothing(
    tiny_bert: Path, data_dir: Path, database_url: URL, tmp_path: Path
) -> None:
    make_tiny_version(Registry(data_dir / "models"), tiny_bert, with_onnx=True)
    await upgrade_database(database_url)
    engine = create_db_engine(database_url)
    async with SlackStandIn() as slack, bot_subprocess(slack, database_url, tmp_path) as bot:
        posts = SlowAnswers(slack, "chat.postMessage", POST_ANSWER_S)
        events: list[dict[str, Any]] = []
        sent, killed = asyncio.Event(), asyncio.Event()
        redelivered: set[str] = set()

        async def deliver(event: dict[str, Any]) -> None:
            """As Slack: the same envelope again (X-Slack-Retry-Num) until some delivery is answered 200;
            a dead bot refuses the connection, a dying one drops it."""
            envelope = slack.event_envelope(event)
            for attempt in range(240):
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    retry = {"retry_num": attempt} if attempt else {}
                    response = await slack.send_envelope(envelope, timeout=3.0, **retry)
                    if response.status == 200:
                        return
                redelivered.add(event["ts"])
                await asyncio.sleep(REDELIVERY_S)
            raise AssertionError(f"{event['ts']} never acknowledged:\n{bot.logs()}")

        async def load() -> None:
            deliveries = []
            for i in range(MESSAGES):
                # posted as it is sent (the stand-in's history has it from then on, as Slack's would)
                channel = CHANNELS[i % len(CHANNELS)]
                event = slack.message_event(channel, CUSTOMER, f"Invoice {i} shows the wrong VAT")
                events.append(event)
                deliveries.append(asyncio.ensure_future(deliver(event)))
                if i + 1 == KILL_AFTER:
                    sent.set()
                if i + 1 == HELD_AFTER:
                    await killed.wait()
                await asyncio.sleep(1 / RATE)
            await asyncio.gather(*deliveries)

        async def crash() -> None:
            await sent.wait()
            await slack.wait_for("chat.postMessage", count=10, timeout=60)  # replies are going out
            assert await eventually(posts.any_pending)
            await bot.kill()  # with a reply in Slack that the bot has not heard of
            killed.set()
            await bot.start()

        await asyncio.gather(load(), crash())
        answered_once = {e["ts"]: 1 for e in events}

        async def all_answered() -> bool:
            return set(_replies_per_thread(slack)) == set(answered_once)

        async def all_classified() -> bool:
            async with create_session_factory(engine)() as session:
                query = select(func.count()).where(Message.state == MessageState.CLASSIFIED)
                return await session.scalar(query) == MESSAGES

        def story() -> str:
            calls = Counter(f"{c.method} {c.status} {c.response.get('error', '')}" for c in slack.calls)
            return f"Web API calls: {dict(calls)}\n{bot.logs()}"

        try:
            assert await eventually(all_answered, within_s=60), story()
            assert await eventually(all_classified, within_s=30), story()
            await bot.stop()  # whatever it was still going to post, it has posted now
            assert _replies_per_thread(slack) == answered_once  # 0 lost, 0 duplicated
            async with create_session_factory(engine)() as session:
                stored = list(await session.scalars(select(Message.ts)))
            assert sorted(stored) == sorted(answered_once)  # each stored once
            assert redelivered  # some arrived while the bot was down: the fault was under load
        finally:
            await engine.dispose()
    assert bot.starts == 2

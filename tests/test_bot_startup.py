"""Starting the bot while Slack is unreachable or rejects the token: one line each, never a traceback.

Slack unreachable (a network blip, DNS at container start, a mistyped ``SLACK_API_URL``) is waited out
with a capped back-off, and in ``triage up`` the classifier serves meanwhile; a token Slack rejects stops
start-up with one line naming ``SLACK_BOT_TOKEN``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import signal
import socket
import sys
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from bot import main as bot_main
from bot.main import RunningBot, StartupError, start_bot
from bot.settings import BotSettings, load_settings
from bot.storage.database import upgrade_database
from classifier.registry import Registry
from tests.support.slack_standin import SlackStandIn
from tests.support.tiny_model import make_tiny_version
from tests.test_quickstart import free_port

CHANNEL = "C0TRIAGE"
UNREACHABLE = "Slack is not reachable"
REPO = Path(__file__).resolve().parents[1]


class LogSignal(logging.Handler):
    """Sets an event when a record containing ``text`` is logged; keeps every record it saw."""

    def __init__(self, text: str):
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = asyncio.Event()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.text in record.getMessage():
            self.seen.set()


@pytest.fixture
def log_signal() -> Iterator[Any]:
    handlers: list[LogSignal] = []

    def make(text: str) -> LogSignal:
        handler = LogSignal(text)
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
        handlers.append(handler)
        return handler

    yield make
    for handler in handlers:
        logging.getLogger().removeHandler(handler)


@pytest.fixture
async def ready(tiny_bert: Path, data_dir: Path, database_url: URL) -> AsyncIterator[Any]:
    """A migrated database and a model; ``settings(slack, **over)`` for a bot talking to ``slack``."""
    await upgrade_database(database_url)
    make_tiny_version(Registry(data_dir / "models"), tiny_bert)
    bots: list[RunningBot] = []

    def settings(slack: SlackStandIn, **over: Any) -> BotSettings:
        values: dict[str, Any] = {
            "slack_bot_token": slack.bot_token,
            "slack_signing_secret": slack.signing_secret,
            "slack_api_url": slack.api_url,
            "database_url": database_url.render_as_string(hide_password=False),
            "host": "127.0.0.1",
            "port": 0,
            "triage_channels": CHANNEL,
            "triage_retrain_cron": "",
            "triage_embedded_classifier": "thread",  # the default's child process: tests/test_child.py
        }
        return load_settings(_env_file=None, **{**values, **over})

    yield settings, bots
    for bot in bots:
        await bot.stop()


async def test_the_bot_waits_for_slack_to_become_reachable(ready: Any, log_signal: Any) -> None:
    settings, bots = ready
    port = free_port()
    slack = SlackStandIn(port=port)  # not started yet: connections to its port are refused
    unreachable = log_signal(UNREACHABLE)
    starting = asyncio.ensure_future(
        start_bot(settings(slack, slack_api_url=f"http://127.0.0.1:{port}/api/"))
    )
    await asyncio.wait_for(unreachable.seen.wait(), timeout=20)
    assert not starting.done()
    async with slack:
        bot = await asyncio.wait_for(starting, timeout=20)
        bots.append(bot)
        slack.bot_url = f"http://127.0.0.1:{bot.port}/slack/events"
        event = slack.message_event(CHANNEL, "U0CUSTOMER", "The invoice page is blank")
        assert (await slack.send_event(event)).status == 200
        await slack.wait_for("chat.postMessage", predicate=lambda c: c.args.get("thread_ts") == event["ts"])
    lines = [r for r in unreachable.records if UNREACHABLE in r.getMessage()]
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in lines)
    message = lines[0].getMessage()
    assert "\n" not in message and f"127.0.0.1:{port}" in message and "trying again in" in message


async def test_slack_errors_at_start_are_retried_until_it_answers(ready: Any, log_signal: Any) -> None:
    settings, bots = ready
    async with SlackStandIn() as slack:
        slack.fail_next("auth.test", status=503)
        unreachable = log_signal(UNREACHABLE)
        bots.append(await asyncio.wait_for(start_bot(settings(slack)), timeout=20))
    assert [r.getMessage() for r in unreachable.records if UNREACHABLE in r.getMessage()] == [
        f"{UNREACHABLE} at {slack.api_url} (auth.test: HTTP 503 internal_error); trying again in 1 s"
    ]


@pytest.mark.parametrize("error", ["invalid_auth", "not_authed", "account_inactive", "token_revoked"])
async def test_a_token_slack_rejects_stops_start_up_naming_the_variable(ready: Any, error: str) -> None:
    settings, _ = ready
    async with SlackStandIn() as slack:
        if error == "invalid_auth":  # a token this workspace does not know, for real
            config = settings(slack, slack_bot_token="xoxb-some-other-token")
        else:
            slack.fail_next("auth.test", error=error)
            config = settings(slack)
        with pytest.raises(StartupError) as stopped:
            await asyncio.wait_for(start_bot(config), timeout=20)
    assert str(stopped.value) == f"Slack rejected SLACK_BOT_TOKEN (auth.test: {error})"


async def test_no_warning_about_the_token_at_start(
    ready: Any, log_signal: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bolt warns "As you gave `client` as well, `token` will be unused" whenever SLACK_BOT_TOKEN is in
    the environment, as it is in every deployment: noise at every start."""
    settings, bots = ready
    records = log_signal("will be unused")
    async with SlackStandIn() as slack:
        monkeypatch.setenv("SLACK_BOT_TOKEN", slack.bot_token)
        bots.append(await start_bot(settings(slack)))
    assert not records.seen.is_set()
    assert not [r for r in records.records if r.levelno >= logging.WARNING]


# ---- the command line, as an operator runs it -----------------------------------------------------------


async def _read_until(
    stream: asyncio.StreamReader, pattern: str, lines: list[str], within_s: float = 120
) -> re.Match[str]:
    """The first line matching ``pattern`` (lines read are kept in ``lines``)."""

    async def scan() -> re.Match[str]:
        while raw := await stream.readline():
            lines.append(raw.decode(errors="replace").rstrip("\n"))
            if match := re.search(pattern, lines[-1]):
                return match
        raise AssertionError(f"output ended before {pattern!r}:\n" + "\n".join(lines[-40:]))

    try:
        return await asyncio.wait_for(scan(), within_s)
    except TimeoutError:
        raise AssertionError(f"no {pattern!r} within {within_s:.0f}s:\n" + "\n".join(lines[-40:])) from None


def _environment(data_dir: Path, database_url: URL, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLACK_", "CLASSIFIER_", "TRIAGE_")) and k != "DATABASE_URL"
    }
    env.update(
        TRIAGE_DATA_DIR=str(data_dir),
        DATABASE_URL=database_url.render_as_string(hide_password=False),
        SLACK_SIGNING_SECRET="test-signing-secret",
        HOST="127.0.0.1",
        PORT="0",
        TRIAGE_RETRAIN_CRON="",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_triage_up_serves_the_classifier_while_slack_is_unreachable(
    ready: Any, data_dir: Path, database_url: URL
) -> None:
    slack_port, classifier_port = free_port(), free_port()
    slack = SlackStandIn(port=slack_port)
    env = _environment(
        data_dir,
        database_url,
        SLACK_BOT_TOKEN=slack.bot_token,
        SLACK_API_URL=f"http://127.0.0.1:{slack_port}/api/",
        TRIAGE_CHANNELS=CHANNEL,
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        "up",
        "--port",
        str(classifier_port),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        await _read_until(process.stdout, UNREACHABLE, lines)
        await _read_until(process.stdout, "classifier ready", lines)
        page = f"http://127.0.0.1:{classifier_port}/"
        async with aiohttp.ClientSession() as http, http.get(page) as response:
            assert response.status == 200  # the classifier and its page serve meanwhile
        async with slack:
            bot_port = (await _read_until(process.stdout, r"Slack bot running \(HTTP port (\d+)\)", lines))[1]
            slack.bot_url = f"http://127.0.0.1:{bot_port}/slack/events"
            event = slack.message_event(CHANNEL, "U0CUSTOMER", "I cannot log in since this morning")
            assert (await slack.send_event(event)).status == 200
            await slack.wait_for(
                "chat.postMessage", predicate=lambda c: c.args.get("thread_ts") == event["ts"], timeout=30
            )
            process.send_signal(signal.SIGINT)
            rest, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines.extend(rest.decode(errors="replace").splitlines())
    output = "\n".join(lines)
    assert process.returncode == 0, output
    assert "Traceback" not in output and "ClientConnectorError" not in output, output
    assert "will be unused" not in output
    # one engine: the bot classifies through the server `triage up` runs, which loaded the model once
    assert len([line for line in lines if "serving model v1" in line]) == 1, output


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize("command", [["bot"], ["up", "--port", "0"]])
async def test_a_rejected_token_stops_the_command_with_one_line(
    ready: Any, data_dir: Path, database_url: URL, command: list[str]
) -> None:
    async with SlackStandIn() as slack:
        env = _environment(
            data_dir, database_url, SLACK_BOT_TOKEN="xoxb-revoked-long-ago", SLACK_API_URL=slack.api_url
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot.cli",
            *command,
            cwd=REPO,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 2
    lines = err.decode().splitlines()  # start-up log lines (INFO), then the one that matters
    assert lines[-1] == "error: Slack rejected SLACK_BOT_TOKEN (auth.test: invalid_auth)"
    assert [line for line in lines if "SLACK_BOT_TOKEN" in line or "Traceback" in line] == lines[-1:]
    assert "xoxb-revoked-long-ago" not in (out + err).decode()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_classifier_process_that_cannot_start_stops_the_bot_with_one_line(
    ready: Any, data_dir: Path, database_url: URL
) -> None:
    """Without CLASSIFIER_URL the bot starts its classifier process while it waits for Slack; a model that
    cannot be loaded stops it at once, with one line saying why."""
    [version] = Registry(data_dir / "models").list()
    (Path(version.path) / "heads.safetensors").write_bytes(b"not a safetensors file")
    port = free_port()  # nothing listens: the bot is still waiting for Slack when the classifier fails
    env = _environment(
        data_dir, database_url, SLACK_BOT_TOKEN="xoxb-test", SLACK_API_URL=f"http://127.0.0.1:{port}/api/"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        "bot",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 2
    lines = err.decode().splitlines()  # start-up log lines, then the one that matters
    assert lines[-1].startswith("error: the classifier process did not start: model v1 in "), lines
    assert [line for line in lines if "deserializ" in line or "Traceback" in line] == lines[-1:]


async def test_a_start_up_failing_halfway_closes_what_had_started(
    ready: Any, log_signal: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bot's port is taken: the database, the classifier and the scheduler had started, and are
    closed in reverse order before the error propagates; a close that fails is logged, not silent, and
    the rest still close."""
    settings, _ = ready
    closed: list[str] = []
    started: dict[str, Any] = {}

    def make_classifier(*args: Any, **kwargs: Any) -> Any:
        classifier = bot_main_make_classifier(*args, **kwargs)
        close = classifier.close

        async def failing_close() -> None:
            await close()
            closed.append("classifier")
            raise RuntimeError("the classifier would not close")

        classifier.close = failing_close
        return classifier

    def build_scheduler(*args: Any, **kwargs: Any) -> Any:
        started["scheduler"] = bot_main_build_scheduler(*args, **kwargs)
        return started["scheduler"]

    async def dispose(engine: AsyncEngine, close: bool = True) -> None:
        closed.append("database")
        await async_engine_dispose(engine, close)

    bot_main_make_classifier, bot_main_build_scheduler = bot_main.make_classifier, bot_main.build_scheduler
    async_engine_dispose = AsyncEngine.dispose
    monkeypatch.setattr(bot_main, "make_classifier", make_classifier)
    monkeypatch.setattr(bot_main, "build_scheduler", build_scheduler)
    monkeypatch.setattr(AsyncEngine, "dispose", dispose)
    failed_close = log_signal("closing the classifier failed")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        async with SlackStandIn() as slack:
            with pytest.raises(OSError):
                await asyncio.wait_for(start_bot(settings(slack, port=taken.getsockname()[1])), timeout=60)
    assert closed == ["classifier", "database"]
    assert not started["scheduler"].running
    assert failed_close.seen.is_set()


# ---- the heap left out of garbage collections ------------------------------------------------------------


async def test_run_bot_freezes_the_start_up_heap_once_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the bot serves, what start-up loaded is frozen (``freeze_startup_heap``), before any event."""
    steps: list[str] = []

    class Started:
        async def stop(self) -> None:
            steps.append("stopped")

    async def start_bot(settings: BotSettings) -> Started:
        steps.append("started")
        return Started()

    def freeze() -> None:
        steps.append("frozen")
        os.kill(os.getpid(), signal.SIGTERM)  # run_bot's own handler stops it

    monkeypatch.setattr(bot_main, "start_bot", start_bot)
    monkeypatch.setattr(bot_main, "freeze_startup_heap", freeze)
    settings = load_settings(_env_file=None, slack_bot_token="xoxb-test", slack_signing_secret="secret")
    await asyncio.wait_for(bot_main.run_bot(settings), timeout=20)
    assert steps == ["started", "frozen", "stopped"]


def test_a_frozen_start_up_heap_is_skipped_by_collections_and_later_garbage_still_collected() -> None:
    """Python's full collections walk every object tracked: with torch and transformers loaded (some
    300,000 objects) each one stopped the event loop for 0.1-1 s under load. Frozen, start-up's objects
    are skipped; start-up's garbage is collected first, and garbage made later is still collected."""

    class Node:
        def __init__(self) -> None:
            self.me = self  # a reference cycle: only the cyclic collector frees it

    def garbage() -> weakref.ref[Node]:
        return weakref.ref(Node())

    kept, startup_garbage = Node(), garbage()
    try:
        bot_main.freeze_startup_heap()
        assert startup_garbage() is None  # collected, not frozen for ever
        assert gc.get_freeze_count() > 0
        later_garbage = garbage()
        gc.collect()
        assert later_garbage() is None
        assert kept.me is kept
    finally:
        gc.unfreeze()

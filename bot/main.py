"""Start the bot: check configuration and schema, wire the parts together, serve until a signal arrives."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import SecretStr
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.app import build_app, http_app, make_web_client
from bot.commands import Commands
from bot.reactions import ReactionMap
from bot.retrain import Acceptance, Gate, Retrainer, mirror_versions
from bot.scheduler import build_scheduler
from bot.settings import BotSettings
from bot.storage.database import check_schema, create_engine, create_session_factory, resolve_database_url
from bot.triage import ChannelPacer, Triage
from classifier.client import make_classifier
from classifier.engine import EngineConfig
from classifier.paths import registry_dir
from classifier.registry import Registry

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The bot cannot start; the message says what to fix."""


@dataclass
class RunningBot:
    """Everything a running bot holds, so tests can start one in-process and stop it cleanly."""

    settings: BotSettings
    triage: Triage
    commands: Commands
    retrainer: Retrainer
    runner: web.AppRunner | None
    port: int | None
    stop_event: asyncio.Event
    _cleanup: list[Any]

    async def stop(self) -> None:
        self.stop_event.set()
        for step in reversed(self._cleanup):
            with contextlib.suppress(Exception):
                result = step()
                if asyncio.iscoroutine(result):
                    await result


async def start_bot(settings: BotSettings, reactions: ReactionMap | None = None) -> RunningBot:
    """Start serving (HTTP or Socket Mode) and the background work; returns at once."""
    url = resolve_database_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        # one connection: SQLite has one writer anyway, and its busy handler sleeps (up to 100 ms a try)
        # when several connections compete, which made acknowledgements slow under load
        engine = create_engine(url, pool_size=1, max_overflow=0, pool_timeout=30)
    else:  # room for the workers and the listeners at once; beyond it a request waits, never loses a message
        engine = create_engine(url, pool_size=20, max_overflow=20, pool_timeout=30)
    cleanup: list[Any] = [engine.dispose]
    try:
        await check_schema(engine)
    except Exception as exc:
        await engine.dispose()
        raise StartupError(str(exc)) from exc
    sessions = create_session_factory(engine)
    registry = Registry(registry_dir())
    if registry.names():  # the registry is shared with the classifier (same data directory or volume)
        async with sessions.begin() as session:
            await mirror_versions(session, registry)
    client = make_web_client(settings)
    try:
        auth = await client.auth_test()
    except SlackApiError as exc:
        await engine.dispose()
        raise StartupError(
            f"Slack rejected SLACK_BOT_TOKEN (auth.test: {exc.response.get('error')})"
        ) from None
    # in-process, the model leaves one core to the event loop, so acknowledgements stay fast under load
    embedded = EngineConfig(
        cpu_threads=max(1, (os.cpu_count() or 2) - 1),
        backend=settings.classifier_backend,
        quantize=settings.classifier_quantize,
    )
    classifier = make_classifier(
        settings.classifier_url,
        _secret(settings.classifier_token),
        admin_token=_secret(settings.classifier_admin_token),
        engine_config=embedded,
    )
    cleanup.append(classifier.close)
    pacer = ChannelPacer()
    triage = Triage(
        settings,
        sessions,
        classifier,
        client,
        reactions or ReactionMap.load(settings.triage_reactions_file),
        pacer,
        bot_user_id=str(auth.get("user_id") or ""),
    )
    retrainer = Retrainer(
        sessions,
        engine.url.render_as_string(hide_password=False),
        post=_poster(client, pacer),
        upload=_uploader(client),
        summary_channel=settings.triage_summary_channel or settings.triage_escalation_channel,
        epochs=settings.triage_retrain_epochs,
        gate=Gate(
            tolerance=settings.triage_gate_tolerance,
            max_recall_drop=settings.triage_gate_max_recall_drop,
            recall_drop_alpha=settings.triage_gate_recall_drop_alpha,
            backend=settings.classifier_backend,
            quantize=settings.classifier_quantize,
        ),
        acceptance=Acceptance(
            after_hours=settings.triage_retrain_accept_after_hours,
            max_rows=settings.triage_retrain_max_accepted,
        ),
    )
    commands = Commands(settings, sessions, classifier, retrainer)
    app = build_app(settings, triage, commands, client)

    stop = asyncio.Event()
    worker = asyncio.ensure_future(triage.run(stop))
    cleanup.append(lambda: asyncio.wait_for(worker, timeout=10))
    scheduler = build_scheduler(settings, sessions, retrainer)
    scheduler.start()
    cleanup.append(lambda: scheduler.shutdown(wait=False))

    async def drain() -> None:  # let acknowledged work finish before the database goes away
        tasks = list(getattr(app, "background_tasks", ()))
        if tasks:
            await asyncio.wait(tasks, timeout=20)

    runner: web.AppRunner | None = None
    port: int | None = None
    if settings.socket_mode:
        from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

        assert settings.slack_app_token is not None
        handler = AsyncSocketModeHandler(app, settings.slack_app_token.get_secret_value())
        await handler.connect_async()
        cleanup.append(drain)
        cleanup.append(handler.close_async)
    else:
        runner = web.AppRunner(http_app(app), shutdown_timeout=10)
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else settings.port
        cleanup.append(drain)
        cleanup.append(runner.cleanup)
    log.info(
        "triage bot up (%s), bot user %s",
        "Socket Mode" if settings.socket_mode else f"HTTP on port {port}",
        auth.get("user_id"),
    )
    return RunningBot(settings, triage, commands, retrainer, runner, port, stop, cleanup)


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value else None


def _poster(client: AsyncWebClient, pacer: ChannelPacer) -> Any:
    async def post(channel: str, text: str, thread_ts: str | None) -> str | None:
        await pacer.wait(channel)
        try:
            response = await client.chat_postMessage(channel=channel, text=text, thread_ts=thread_ts)
        except SlackApiError as exc:
            log.warning("posting to %s failed: %s", channel, exc.response.get("error"))
            return None
        return str(response.get("ts"))

    return post


def _uploader(client: AsyncWebClient) -> Any:
    async def upload(channel: str, path: str, title: str) -> None:
        try:
            await client.files_upload_v2(channel=channel, file=path, title=title)
        except (SlackApiError, OSError) as exc:
            log.warning("uploading %s to %s failed: %s", path, channel, exc)

    return upload


async def run_bot(settings: BotSettings) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    bot = await start_bot(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, bot.stop_event.set)
    await bot.stop_event.wait()
    log.info("shutting down")
    await bot.stop()

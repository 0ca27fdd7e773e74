"""Start the bot: check configuration and schema, wire the parts together, serve until a signal arrives."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from pydantic import SecretStr
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.agents import Agents
from bot.app import build_app, health_app, http_app
from bot.backfill import Backfill
from bot.commands import Commands
from bot.delivery import missing_invites
from bot.digest import Digest, add_digest
from bot.drift import add_drift
from bot.reactions import ReactionMap
from bot.retrain import Retrainer
from bot.scheduler import build_scheduler
from bot.settings import BotSettings
from bot.slack_output import SlackOutput, make_web_client, slack_session
from bot.socket_mode import SocketModeLink
from bot.storage.database import check_schema, create_db_engine, create_session_factory, resolve_database_url
from bot.storage.models import utcnow
from bot.triage import Triage
from classifier.child import ClassifierStartError, spare_core_threads
from classifier.client import ChildClassifier, Classifier, make_classifier
from classifier.engine import EngineConfig
from classifier.logsafe import AccessLogger
from classifier.paths import registry_dir
from classifier.registry import Registry, RegistryError
from classifier.retry import RetryPolicy
from classifier.schema import schema_heads

log = logging.getLogger(__name__)
T = TypeVar("T")

# Slack unreachable at start: tried again after 1 s, doubling up to 30 s, until it answers
SLACK_RETRY = RetryPolicy(attempts=None, backoff_s=1.0, max_backoff_s=30.0, jitter=False)
# auth.test errors that mean the token itself is refused: no retry can help
REJECTED_TOKEN = frozenset(
    {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"}
)


class StartupError(RuntimeError):
    """The bot cannot start; the message says what to fix."""


class SlackUnreachable(Exception):
    """``auth.test`` got no answer (or a failure on Slack's side): a later try may get one."""


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
    _resources: contextlib.AsyncExitStack  # closes what start_bot started, in reverse order
    link: SocketModeLink | None = None  # Socket Mode only
    backfill: Backfill | None = None

    async def stop(self) -> None:
        self.stop_event.set()
        await self._resources.aclose()


def _on_close(resources: contextlib.AsyncExitStack, what: str, close: Callable[[], object]) -> None:
    """Close ``what`` when ``resources`` closes; a failure is logged and the other resources still close."""

    async def closing() -> None:
        try:
            result = close()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("stopping the bot: closing %s failed", what)

    resources.push_async_callback(closing)


async def start_bot(settings: BotSettings, reactions: ReactionMap | None = None) -> RunningBot:
    """Start serving (HTTP or Socket Mode) and the background work; returns at once.

    Each resource is registered for closing as soon as it exists: when a later step fails (or start-up is
    cancelled) what had started is closed, in reverse order, before the error propagates."""
    async with contextlib.AsyncExitStack() as resources:
        bot = await _start_bot(settings, reactions, resources)
        bot._resources = resources.pop_all()  # from now on, RunningBot.stop closes them
        return bot


async def _start_bot(
    settings: BotSettings, reactions: ReactionMap | None, resources: contextlib.AsyncExitStack
) -> RunningBot:
    db_engine = await _open_database(settings, resources)
    sessions = create_session_factory(db_engine)
    registry = Registry(registry_dir())
    if registry.names():  # the registry is shared with the classifier (same data directory or volume)
        await _log_missing_heads(settings, registry)
    session = slack_session()  # one pool of Slack connections for every Web API call
    _on_close(resources, "the Slack connections", session.close)
    client = make_web_client(settings, session=session)
    classifier = _classifier(settings, resources)
    # the classifier process loads the model while Slack is asked who we are
    auth = await _meanwhile(wait_for_slack(settings), _start_classifier(classifier))
    for line in await missing_invites(settings, client):
        log.error("the bot cannot post to a channel it needs: %s", line)
    output = SlackOutput(client)
    agents = Agents(
        client,
        team_id=str(auth.get("team_id") or ""),
        admins=settings.triage_admins,
        configured=settings.triage_agents,
    )
    await agents.group_members()  # TRIAGE_AGENTS' user groups, looked up once before the first event
    triage = Triage(
        settings,
        sessions,
        classifier,
        output,
        reactions or ReactionMap.load(settings.triage_reactions_file),
        bot_user_id=str(auth.get("user_id") or ""),
        agents=agents,
    )
    retrainer = Retrainer(
        sessions,
        db_engine,
        post=output.post_text,
        upload=output.upload,
        summary_channel=settings.triage_summary_channel or settings.triage_escalation_channel,
        options=settings.run_options(),
    )
    commands = Commands(settings, sessions, classifier, agents, retrainer)
    app = build_app(settings, triage, commands, client)

    stop = _start_worker(triage, resources)
    digest = Digest(settings, sessions, output, commands.review)
    _start_schedule(settings, db_engine, sessions, retrainer, digest, triage, resources)
    _on_close(resources, "the acknowledged work", lambda: _drain(app))
    listening_since = utcnow()  # what is stored from now on was heard live: the backfill reads before it
    link = await _start_socket_mode(settings, app, resources) if settings.socket_mode else None
    runner, port = await _serve_http(settings, app, triage, link, resources)
    backfill = start_backfill(client, triage, auth, link, resources, listening_since)
    log.info(
        "triage bot up (%s on port %s), bot user %s",
        "Socket Mode, /healthz" if settings.socket_mode else "HTTP",
        port,
        auth.get("user_id"),
    )
    return RunningBot(settings, triage, commands, retrainer, runner, port, stop, resources, link, backfill)


async def _open_database(settings: BotSettings, resources: contextlib.AsyncExitStack) -> AsyncEngine:
    """The database db_engine, once the schema is known to be the one this code needs."""
    url = resolve_database_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        # one connection: SQLite has one writer anyway, and its busy handler sleeps (up to 100 ms a try)
        # when several connections compete, which made acknowledgements slow under load
        db_engine = create_db_engine(url, pool_size=1, max_overflow=0, pool_timeout=30)
    else:  # room for the workers and the listeners at once; beyond it a request waits, never loses a message
        db_engine = create_db_engine(url, pool_size=20, max_overflow=20, pool_timeout=30)
    _on_close(resources, "the database engine", db_engine.dispose)
    try:
        await check_schema(db_engine)
    except Exception as exc:
        raise StartupError(str(exc)) from exc
    return db_engine


def _classifier(settings: BotSettings, resources: contextlib.AsyncExitStack) -> Classifier:
    """The classifier server at CLASSIFIER_URL, or the embedded one (not started yet)."""
    # embedded, the model leaves one core to the event loop, so acknowledgements stay fast under load
    classifier = make_classifier(
        settings.classifier_url,
        _secret(settings.classifier_token),
        admin_token=_secret(settings.classifier_admin_token),
        engine_config=EngineConfig(
            cpu_threads=spare_core_threads(),
            backend=settings.classifier_backend,
            quantize=settings.classifier_quantize,
        ),
        embedded=settings.triage_embedded_classifier,
    )
    _on_close(resources, "the classifier", classifier.close)
    return classifier


def _start_worker(triage: Triage, resources: contextlib.AsyncExitStack) -> asyncio.Event:
    """The work queue that classifies and answers stored messages; the event that stops it."""
    stop = asyncio.Event()
    worker = asyncio.ensure_future(triage.run(stop))

    async def stop_worker() -> None:
        stop.set()
        await asyncio.wait_for(worker, timeout=10)

    _on_close(resources, "the triage worker", stop_worker)
    return stop


def _start_schedule(
    settings: BotSettings,
    db_engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    retrainer: Retrainer,
    digest: Digest,
    triage: Triage,
    resources: contextlib.AsyncExitStack,
) -> None:
    """The scheduled jobs: retraining, the daily digest (bot/digest.py), drift checks (bot/drift.py)."""
    scheduler = build_scheduler(settings, db_engine, sessions, retrainer)
    add_digest(scheduler, digest)
    add_drift(scheduler, triage.drift)
    scheduler.start()
    _on_close(resources, "the scheduler", lambda: scheduler.shutdown(wait=False))


async def _drain(app: AsyncApp) -> None:
    """Let acknowledged work finish before the database goes away."""
    tasks = list(getattr(app, "background_tasks", ()))
    if tasks:
        await asyncio.wait(tasks, timeout=20)


async def _start_socket_mode(
    settings: BotSettings, app: AsyncApp, resources: contextlib.AsyncExitStack
) -> SocketModeLink:
    assert settings.slack_app_token is not None
    link = SocketModeLink(
        app,
        settings.slack_app_token.get_secret_value(),
        ping_interval_s=settings.triage_socket_ping_interval_s,
        dead_after_s=settings.triage_socket_dead_after_s,
    )
    _on_close(resources, "the Socket Mode link", link.close)
    await link.start()
    return link


async def _serve_http(
    settings: BotSettings,
    app: AsyncApp,
    triage: Triage,
    link: SocketModeLink | None,
    resources: contextlib.AsyncExitStack,
) -> tuple[web.AppRunner, int]:
    """Slack's events over HTTP (or, in Socket Mode, only /healthz and /metrics); the runner and its port."""
    if link is not None:
        web_app = health_app(triage, link.health)  # Slack talks over the link; HTTP: /healthz, /metrics
    else:
        assert settings.slack_signing_secret is not None  # required in HTTP mode (settings)
        web_app = http_app(app, settings.slack_signing_secret.get_secret_value(), triage)
    runner = web.AppRunner(web_app, shutdown_timeout=10, access_log_class=AccessLogger)
    _on_close(resources, "the HTTP server", runner.cleanup)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    server = getattr(site, "_server", None)
    sockets = getattr(server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else settings.port
    return runner, port


def start_backfill(
    client: AsyncWebClient,
    triage: Triage,
    auth: dict[str, Any],
    link: SocketModeLink | None,
    resources: contextlib.AsyncExitStack,
    listening_since: datetime | None = None,
) -> Backfill:
    """Read what was posted while the bot was away: now, and after every Socket Mode reconnect."""
    backfill = Backfill(
        triage,
        client,
        team_id=str(auth.get("team_id") or ""),
        bot_user_id=str(auth.get("user_id") or ""),
        bot_id=str(auth.get("bot_id") or ""),
    )
    tasks: set[asyncio.Task[None]] = set()

    def start(since: datetime | None = None) -> None:  # a reconnect: events arrive again from now
        task = asyncio.ensure_future(backfill.run_logged(since))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def stop() -> None:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    _on_close(resources, "the backfill", stop)
    if link is not None:
        link.on_reconnect = start
    start(listening_since)
    return backfill


async def wait_for_slack(settings: BotSettings) -> dict[str, Any]:
    """``auth.test`` until Slack answers: who the bot is. Unreachable (a network blip, DNS at container
    start, a mistyped SLACK_API_URL) or failing on Slack's side is retried with a capped back-off, one line
    each; a token Slack rejects is a ``StartupError`` naming the variable."""
    client = make_web_client(settings, retry=False)  # SLACK_RETRY is the retry

    async def who_am_i() -> dict[str, Any]:
        try:
            return dict((await client.auth_test()).data)  # type: ignore[arg-type]
        except SlackApiError as exc:
            error = exc.response.get("error")
            if error in REJECTED_TOKEN:
                raise StartupError(f"Slack rejected SLACK_BOT_TOKEN (auth.test: {error})") from None
            raise SlackUnreachable(f"auth.test: HTTP {exc.response.status_code} {error}") from exc
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise SlackUnreachable(" ".join(str(exc).split()) or type(exc).__name__) from exc

    def waiting(reason: Exception, delay: float) -> None:
        log.warning(
            "Slack is not reachable at %s (%s); trying again in %.0f s",
            _without_credentials(settings.slack_api_url),
            reason,
            delay,
        )

    return await SLACK_RETRY.call(who_am_i, retry_on=SlackUnreachable, before_wait=waiting)


async def _start_classifier(classifier: Classifier) -> None:
    if isinstance(classifier, ChildClassifier):
        try:
            await classifier.start()
        except ClassifierStartError as exc:
            raise StartupError(str(exc)) from None


async def _meanwhile(main: Awaitable[T], side: Awaitable[None]) -> T:
    """``main``'s result once both are done; the first failure cancels the other and is raised."""
    tasks = [asyncio.ensure_future(main), asyncio.ensure_future(side)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        await asyncio.gather(*tasks)
        return tasks[0].result()  # type: ignore[no-any-return]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


async def _log_missing_heads(settings: BotSettings, registry: Registry) -> None:
    """Say at start-up what will not work because the active model lacks heads the bot uses."""
    try:
        active = await asyncio.to_thread(registry.active)
    except RegistryError:
        return
    for line in settings.missing_heads(schema_heads(active.schema)):
        log.warning("the active model %s lacks a head the bot uses: %s", active.name, line)


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value else None


async def run_bot(settings: BotSettings) -> None:
    """Run until SIGINT/SIGTERM (which also ends a wait for Slack at start), then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    bot = await until_stopped(start_bot(settings), stop)
    if bot is None:
        return
    freeze_startup_heap()
    await stop.wait()
    log.info("shutting down")
    await bot.stop()


def freeze_startup_heap() -> None:
    """Leave what start-up loaded (the libraries, torch and transformers among them: some 300,000 objects)
    out of Python's cyclic garbage collector. Its full collections would otherwise walk all of it every few
    seconds under load, stopping the event loop for 0.1-1 s each time, with every acknowledgement in
    flight waiting; what is created later is still collected."""
    gc.collect()  # start-up's garbage goes first: frozen, it would stay
    gc.freeze()


async def until_stopped(starting: Awaitable[T], stop: asyncio.Event) -> T | None:
    """What ``starting`` gives, or ``None`` when ``stop`` came first (``starting`` is then cancelled)."""
    start = asyncio.ensure_future(starting)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not start.done():
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await start
        return None
    return start.result()

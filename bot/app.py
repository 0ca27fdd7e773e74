"""The Slack app: one Bolt ``AsyncApp``; each listener acks first, then hands the work to ``Triage``
or ``Commands``.

HTTP mode serves events, slash commands and interactivity on ``POST /slack/events`` (plus ``/healthz``);
Socket Mode is used when ``SLACK_APP_TOKEN`` is set (``bot/socket_mode.py``), with only ``/healthz`` on HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from slack_bolt.async_app import AsyncApp
from slack_bolt.response import BoltResponse
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot.blocks import DONE_ACTION, FIX_ACTION, SET_ACTION_PREFIX
from bot.commands import Commands
from bot.settings import BotSettings
from bot.triage import IncomingMessage, Triage

log = logging.getLogger(__name__)

# message subtypes that are a customer writing something new; edits, deletions, joins, bot posts are not
NEW_MESSAGE_SUBTYPES = {None, "file_share", "thread_broadcast"}


def make_web_client(settings: BotSettings) -> AsyncWebClient:
    """Web API client with Slack's documented retry rules: 429 waits Retry-After, 5xx and resets retry."""
    return AsyncWebClient(
        token=settings.slack_bot_token.get_secret_value(),
        base_url=settings.slack_api_url,
        retry_handlers=[
            AsyncConnectionErrorRetryHandler(max_retry_count=2),
            AsyncRateLimitErrorRetryHandler(max_retry_count=5),
            AsyncServerErrorRetryHandler(max_retry_count=2),
        ],
    )


def is_new_customer_message(event: dict[str, Any]) -> bool:
    if event.get("subtype") not in NEW_MESSAGE_SUBTYPES:
        return False
    if event.get("bot_id") or event.get("bot_profile") or not event.get("user"):
        return False
    thread_ts = event.get("thread_ts")
    return not thread_ts or thread_ts == event.get("ts")  # replies in a thread are conversation, not new work


def build_app(settings: BotSettings, triage: Triage, commands: Commands, client: AsyncWebClient) -> AsyncApp:
    app = AsyncApp(
        client=client,
        signing_secret=settings.slack_signing_secret.get_secret_value()
        if settings.slack_signing_secret
        else None,
        request_verification_enabled=not settings.socket_mode,
        # listeners store what must not be lost before Slack gets its 200; slow work goes to later()
        process_before_response=True,
        logger=logging.getLogger("bot.bolt"),
    )
    background: set[asyncio.Task[Any]] = set()

    def later(coro: Awaitable[Any], what: str) -> None:
        """Run slow work after the ack; errors are logged, never lost silently."""

        async def guarded() -> None:
            try:
                await coro
            except Exception:
                log.exception("%s failed", what)

        task = asyncio.ensure_future(guarded())
        background.add(task)
        task.add_done_callback(background.discard)

    app.background_tasks = background  # type: ignore[attr-defined]

    @app.event("message")
    async def on_message(body: dict[str, Any], event: dict[str, Any], context: dict[str, Any]) -> None:
        channel = event.get("channel", "")
        if not is_new_customer_message(event) or not settings.watches(channel):
            return
        if event.get("user") == context.get("bot_user_id"):
            return
        incoming = IncomingMessage(
            team_id=body.get("team_id") or event.get("team", ""),
            channel_id=channel,
            ts=event["ts"],
            user_id=event.get("user"),
            text=event.get("text") or "",
            thread_ts=event.get("thread_ts"),
            event_id=body.get("event_id"),
        )
        await triage.on_message(incoming)  # stored before the 200; classified by the work queue

    async def on_reaction(
        body: dict[str, Any], event: dict[str, Any], context: dict[str, Any], added: bool
    ) -> None:
        item = event.get("item") or {}
        if item.get("type") != "message" or event.get("user") == context.get("bot_user_id"):
            return
        refresh = await triage.on_reaction(
            team_id=body.get("team_id", ""),
            user_id=event.get("user", ""),
            reaction=event.get("reaction", ""),
            channel_id=item.get("channel", ""),
            ts=item.get("ts", ""),
            event_id=body.get("event_id"),
            added=added,
        )
        if refresh is not None:
            later(triage.refresh_reply(refresh), "reply update after a reaction")

    @app.event("reaction_added")
    async def on_reaction_added(body: dict[str, Any], event: dict[str, Any], context: dict[str, Any]) -> None:
        await on_reaction(body, event, context, added=True)

    @app.event("reaction_removed")
    async def on_reaction_removed(
        body: dict[str, Any], event: dict[str, Any], context: dict[str, Any]
    ) -> None:
        await on_reaction(body, event, context, added=False)

    # Every other event is acknowledged with 200: Bolt would answer 404, which Slack retries.
    @app.event(re.compile(".*"))
    async def on_other_event() -> None:
        return None

    @app.command("/classify")
    async def classify(ack: Callable[..., Awaitable[None]], command: dict[str, Any], respond: Any) -> None:
        await commands.classify(ack, respond, command)

    @app.command("/triage")
    async def triage_command(
        ack: Callable[..., Awaitable[None]], command: dict[str, Any], respond: Any
    ) -> None:
        await commands.triage(ack, respond, command, later)

    @app.action(FIX_ACTION)
    async def fix(ack: Callable[..., Awaitable[None]], body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        message_id = _int(action.get("value"))
        if message_id is not None:
            later(triage.refresh_reply(message_id, menus_open=True), "open label menus")

    @app.action(DONE_ACTION)
    async def done(ack: Callable[..., Awaitable[None]], action: dict[str, Any]) -> None:
        await ack()
        message_id = _int(action.get("value"))
        if message_id is not None:
            later(triage.refresh_reply(message_id, menus_open=False), "close label menus")

    @app.action(re.compile("^" + re.escape(SET_ACTION_PREFIX)))
    async def set_label(
        ack: Callable[..., Awaitable[None]], body: dict[str, Any], action: dict[str, Any]
    ) -> None:
        await ack()
        head = str(action.get("action_id", ""))[len(SET_ACTION_PREFIX) :]
        label = ((action.get("selected_option") or {}).get("value")) or ""
        container = body.get("container") or {}
        message_id = _int(str(action.get("block_id", "")).removeprefix("fix:"))
        if not head or not label or message_id is None:
            return
        refresh = await triage.on_label_selected(
            team_id=(body.get("team") or {}).get("id", ""),
            user_id=(body.get("user") or {}).get("id", ""),
            message_id=message_id,
            head=head,
            label=label,
            reply_channel=container.get("channel_id", ""),
            reply_ts=container.get("message_ts", ""),
        )
        if refresh is not None:
            later(triage.refresh_reply(refresh, menus_open=True), "reply update after a menu choice")

    @app.error
    async def on_error(error: Exception, body: dict[str, Any]) -> BoltResponse:
        log.exception("unhandled error in a Slack listener (%s)", body.get("type"), exc_info=error)
        return BoltResponse(status=500, body="")

    return app


def _int(value: Any) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]


def _always_healthy() -> tuple[bool, dict[str, Any]]:
    return True, {}


def add_healthz(web_app: web.Application, check: HealthCheck = _always_healthy) -> None:
    """``GET /healthz``: 200 ``{"ok": true, ...}`` when ``check`` says healthy, else 503 with the details."""

    async def healthz(_: web.Request) -> web.Response:
        ok, details = check()
        return web.json_response({"ok": ok, **details}, status=200 if ok else 503)

    web_app.router.add_get("/healthz", healthz)


def http_app(app: AsyncApp) -> web.Application:
    """aiohttp application: Bolt on ``/slack/events`` plus a health check for load balancers."""
    web_app = app.web_app(path="/slack/events")
    add_healthz(web_app)
    return web_app


def health_app(check: HealthCheck) -> web.Application:
    """Socket Mode takes no requests from Slack; this serves only the health check."""
    web_app = web.Application()
    add_healthz(web_app, check)
    return web_app

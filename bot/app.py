"""The Slack app: one Bolt ``AsyncApp``; each listener acks first, then hands the work to ``Triage``
or ``Commands``.

HTTP mode serves events, slash commands and interactivity on ``POST /slack/events`` (plus ``/healthz``);
Socket Mode is used when ``SLACK_APP_TOKEN`` is set (``bot/socket_mode.py``), with only ``/healthz`` on HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from slack_bolt.async_app import AsyncApp
from slack_bolt.logger.messages import warning_client_prioritized_and_token_skipped
from slack_bolt.request.internals import parse_body
from slack_bolt.response import BoltResponse
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from bot import cards, home, review, shortcut
from bot.blocks import DONE_ACTION, SET_ACTION_PREFIX
from bot.commands import Commands, Later
from bot.drift import DriftCollector
from bot.lifecycle import MessageLife
from bot.settings import BotSettings
from bot.storage.models import utcnow
from bot.triage import IncomingMessage, StorageUnavailable, Triage
from classifier.logsafe import escape_controls

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
# message subtypes that are a customer writing something new; edits, deletions, joins, bot posts are not
NEW_MESSAGE_SUBTYPES = {None, "file_share", "thread_broadcast"}
# Slack's request timestamp: whole seconds since the epoch; anything else is refused before it is parsed
REQUEST_TIMESTAMP = re.compile(r"[0-9]{1,15}")
# What the listeners read from the events they handle, with the types Slack documents (optional fields
# are checked when present). Other event types reach only the catch-all listener, which reads nothing.
EVENT_FIELDS: dict[str, dict[str, type]] = {
    "message": {
        "ts": str,
        "channel": str,
        "user": str,
        "text": str,
        "thread_ts": str,
        "subtype": str,
        "bot_id": str,
        "message": dict,  # message_changed: the message as it is now
        "previous_message": dict,
        "deleted_ts": str,  # message_deleted
    },
    "reaction_added": {"user": str, "reaction": str, "item": dict},
    "reaction_removed": {"user": str, "reaction": str, "item": dict},
    "app_home_opened": {"user": str, "channel": str, "tab": str, "view": dict},
}
REQUIRED_EVENT_FIELDS = {"message": ("ts", "channel")}


class _TokenUnusedFilter(logging.Filter):
    """Drops Bolt's "As you gave `client` as well, `token` will be unused": Bolt reads SLACK_BOT_TOKEN from
    the environment (set in every deployment) even when given a client, and warned at every start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != warning_client_prioritized_and_token_skipped()


def is_new_customer_message(event: dict[str, Any]) -> bool:
    if event.get("subtype") not in NEW_MESSAGE_SUBTYPES:
        return False
    if event.get("bot_id") or event.get("bot_profile") or not event.get("user"):
        return False
    thread_ts = event.get("thread_ts")
    return not thread_ts or thread_ts == event.get("ts")  # replies in a thread are conversation, not new work


def build_app(settings: BotSettings, triage: Triage, commands: Commands, client: AsyncWebClient) -> AsyncApp:
    """The Bolt app with every listener; the order matters where two match one event (the catch-all last)."""
    app = _bolt_app(settings, client)
    later = _background_runner(app)
    _register_messages(app, settings, triage)
    _register_reactions(app, triage, later)
    home_page = home.register(app, triage, commands, later)  # app_home_opened: before the catch-all
    _acknowledge_other_events(app)
    _register_commands(app, commands, later)
    _register_label_menus(app, triage, later)
    cards.register(app, triage, commands.agents, later)
    review.register(app, triage, commands.agents, commands.review, later, home_page.publish)
    shortcut.register(app, triage, commands.agents, later)
    app.error(_on_error)
    return app


def _bolt_app(settings: BotSettings, client: AsyncWebClient) -> AsyncApp:
    bolt_log = logging.getLogger("bot.bolt")
    if not any(isinstance(f, _TokenUnusedFilter) for f in bolt_log.filters):
        bolt_log.addFilter(_TokenUnusedFilter())
    return AsyncApp(
        client=client,
        signing_secret=settings.slack_signing_secret.get_secret_value()
        if settings.slack_signing_secret
        else None,
        request_verification_enabled=not settings.socket_mode,
        # listeners store what must not be lost before Slack gets its 200; slow work goes to later()
        process_before_response=True,
        logger=bolt_log,
    )


def _background_runner(app: AsyncApp) -> Later:
    """``later(coro, what)``: run slow work after the ack; errors are logged, never lost silently. The
    running tasks are ``app.background_tasks``."""
    background: set[asyncio.Task[Any]] = set()

    def later(coro: Awaitable[Any], what: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception:
                log.exception("%s failed", what)

        task = asyncio.ensure_future(guarded())
        background.add(task)
        task.add_done_callback(background.discard)

    app.background_tasks = background  # type: ignore[attr-defined]
    return later


def _register_messages(app: AsyncApp, settings: BotSettings, triage: Triage) -> None:
    life = MessageLife(triage)

    @app.event("message")
    async def on_message(body: dict[str, Any], event: dict[str, Any], context: dict[str, Any]) -> None:
        channel = event.get("channel", "")
        if settings.watches(channel) and await life.handle(body, event, context):
            return  # edits, deletions, thread replies, Workflow Builder posts: bot/lifecycle.py
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


def _register_reactions(app: AsyncApp, triage: Triage, later: Later) -> None:
    """Agents correct labels with emoji reactions (bot/reactions.py); removing one takes it back."""

    async def on_reaction(
        body: dict[str, Any], event: dict[str, Any], context: dict[str, Any], added: bool
    ) -> None:
        item = event.get("item") or {}
        if item.get("type") != "message" or event.get("user") == context.get("bot_user_id"):
            return
        user, channel = event.get("user", ""), item.get("channel", "")
        outcome = await triage.on_reaction(
            team_id=body.get("team_id", ""),
            user_id=user,
            reaction=event.get("reaction", ""),
            channel_id=channel,
            ts=item.get("ts", ""),
            event_id=body.get("event_id"),
            added=added,
        )
        if outcome.note:  # why it did not apply (yet): only the agent sees it, where they reacted
            later(triage.output.ephemeral(channel, user, outcome.note), "correction note")
        if outcome.refresh is not None:
            later(triage.after_reaction(outcome.refresh, user, channel), "reply update after a reaction")

    @app.event("reaction_added")
    async def on_reaction_added(body: dict[str, Any], event: dict[str, Any], context: dict[str, Any]) -> None:
        await on_reaction(body, event, context, added=True)

    @app.event("reaction_removed")
    async def on_reaction_removed(
        body: dict[str, Any], event: dict[str, Any], context: dict[str, Any]
    ) -> None:
        await on_reaction(body, event, context, added=False)


def _acknowledge_other_events(app: AsyncApp) -> None:
    # Every other event is acknowledged with 200: Bolt would answer 404, which Slack retries.
    @app.event(re.compile(".*"))
    async def on_other_event() -> None:
        return None


def _register_commands(app: AsyncApp, commands: Commands, later: Later) -> None:
    @app.command("/classify")
    async def classify(ack: Callable[..., Awaitable[None]], command: dict[str, Any], respond: Any) -> None:
        await commands.classify(ack, respond, command)

    @app.command("/triage")
    async def triage_command(
        ack: Callable[..., Awaitable[None]], command: dict[str, Any], respond: Any
    ) -> None:
        await commands.triage(ack, respond, command, later)


def _register_label_menus(app: AsyncApp, triage: Triage, later: Later) -> None:
    """FIX_ACTION (the reply's Fix labels) opens the modal: see bot/cards.py. Replies whose menus an
    earlier version opened in the channel still work."""

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


async def _on_error(error: Exception, body: dict[str, Any]) -> BoltResponse:
    if isinstance(error, StorageUnavailable):  # logged by Triage, once per outage with its traceback
        return BoltResponse(status=503, body="")  # Slack delivers the event again
    log.exception(
        "unhandled error in a Slack listener (%s)", escape_controls(body.get("type")), exc_info=error
    )
    return BoltResponse(status=500, body="")


def _int(value: Any) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def payload_problem(body: Any) -> str | None:
    """Why a Slack payload cannot be handled (a wrong shape or type where a listener reads), or ``None``."""
    if not isinstance(body, dict):
        return f"the payload is a JSON {type(body).__name__}, not an object"
    for key in ("type", "team_id", "event_id"):
        if key in body and not isinstance(body[key], str):
            return f"{key} is not a string"
    if body.get("type") == "event_callback":
        event = body.get("event")
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return "event_callback without an event object"
        fields = EVENT_FIELDS.get(event["type"], {})
        for key in REQUIRED_EVENT_FIELDS.get(event["type"], ()):
            if key not in event:
                return f"{event['type']} event without {key}"
        for key, kind in fields.items():
            if event.get(key) is not None and not isinstance(event[key], kind):
                return f"{event['type']} event: {key} is not a {kind.__name__}"
    if body.get("type") == "block_actions":
        actions = body.get("actions")
        if not isinstance(actions, list) or not all(isinstance(a, dict) for a in actions):
            return "block_actions without a list of actions"
        for key in ("user", "team", "container", "channel"):
            if body.get(key) is not None and not isinstance(body[key], dict):
                return f"block_actions: {key} is not an object"
    if body.get("type") == "message_action":
        for key in ("message", "channel", "user", "team"):
            if not isinstance(body.get(key), dict):
                return f"message_action: {key} is not an object"
    if body.get("type") == "view_submission":
        for key in ("view", "user", "team"):
            if not isinstance(body.get(key), dict):
                return f"view_submission: {key} is not an object"
    return None


class RequestSignature(SignatureVerifier):
    """slack_sdk's verifier (time window, constant-time compare), also for bodies that are not UTF-8:
    Slack signs the bytes, and slack_sdk would fail decoding them."""

    def generate_signature(self, *, timestamp: str, body: str | bytes) -> str | None:
        if not isinstance(body, bytes):
            return super().generate_signature(timestamp=timestamp, body=body)
        base = b"v0:" + timestamp.encode() + b":" + body
        return "v0=" + hmac.new(self.signing_secret.encode(), base, hashlib.sha256).hexdigest()


def checked_slack_requests(signing_secret: str) -> Any:
    """aiohttp middleware in front of Bolt on ``EVENTS_PATH``: what Bolt would fail on never reaches it.

    Unsigned requests, bad signatures and malformed timestamps get 401 (without a traceback: they cost
    an attacker nothing). A signed request whose body is not UTF-8, not JSON, or not shaped as Slack
    documents gets 200 (Slack would retry anything else, forever the same), a warning, and is dropped.
    """
    verifier = RequestSignature(signing_secret)

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "POST" or request.path != EVENTS_PATH:
            return await handler(request)
        raw = await request.read()  # aiohttp keeps it: Bolt reads the same bytes again
        timestamp = request.headers.get("X-Slack-Request-Timestamp", "")
        signature = request.headers.get("X-Slack-Signature", "")
        try:
            body = parse_body(raw.decode("utf-8"), request.content_type)
        except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested too deeply
            body, problem = None, f"{type(exc).__name__}: {str(exc)[:100]}"
        else:
            problem = payload_problem(body)
        if isinstance(body, dict) and body.get("ssl_check") == "1":
            return await handler(request)  # Slack's certificate check is unsigned; Bolt answers it
        if not REQUEST_TIMESTAMP.fullmatch(timestamp) or not verifier.is_valid(raw, timestamp, signature):
            log.debug("refused a Slack request without a valid signature from %s", request.remote)
            return web.json_response({"error": "invalid request"}, status=401)
        if problem is not None:
            log.warning("malformed Slack request ignored (%d bytes): %s", len(raw), problem)
            return web.Response(status=200)
        return await handler(request)

    return middleware


class BacklogCollector(Collector):
    """Messages waiting for an answer, as of the bot's last sweep (a scrape never queries the database)."""

    def __init__(self, triage: Triage):
        self.triage = triage

    def collect(self) -> Iterable[Metric]:
        backlog = self.triage.backlog
        if backlog is None:  # no sweep has finished yet
            return
        yield GaugeMetricFamily(
            "triage_bot_messages_waiting", "Messages stored and not answered yet", value=backlog.waiting
        )
        yield GaugeMetricFamily(
            "triage_bot_messages_retrying",
            "Waiting messages that failed at least once (classifier or Slack unreachable); retried forever",
            value=backlog.failed,
        )
        age = (utcnow() - backlog.oldest).total_seconds() if backlog.oldest else 0.0
        yield GaugeMetricFamily(
            "triage_bot_oldest_waiting_seconds", "Age of the oldest message waiting for an answer", value=age
        )


HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]


def _always_healthy() -> tuple[bool, dict[str, Any]]:
    return True, {}


def add_health_and_metrics(
    web_app: web.Application, triage: Triage, link_health: HealthCheck = _always_healthy
) -> None:
    """``GET /healthz`` (200 ``{"ok": true, ...}`` with the backlog, 503 when the Slack link is down) and
    ``GET /metrics`` (Prometheus), in HTTP and Socket Mode alike."""
    metrics = CollectorRegistry(auto_describe=True)
    metrics.register(BacklogCollector(triage))
    metrics.register(DriftCollector(triage.drift))

    async def healthz(_: web.Request) -> web.Response:
        ok, details = link_health()
        backlog = triage.backlog
        if backlog is not None:
            details = {**details, "waiting": backlog.waiting, "retrying": backlog.failed}
        return web.json_response({"ok": ok, **details}, status=200 if ok else 503)

    async def metrics_endpoint(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics), headers={"Content-Type": CONTENT_TYPE_LATEST})

    web_app.router.add_get("/healthz", healthz)
    web_app.router.add_get("/metrics", metrics_endpoint)


def http_app(app: AsyncApp, signing_secret: str, triage: Triage) -> web.Application:
    """aiohttp application: Bolt on ``EVENTS_PATH``, a health check for load balancers, Prometheus metrics."""
    web_app = app.web_app(path=EVENTS_PATH)
    web_app.middlewares.append(checked_slack_requests(signing_secret))
    add_health_and_metrics(web_app, triage)
    return web_app


def health_app(triage: Triage, link_health: HealthCheck) -> web.Application:
    """Socket Mode takes no requests from Slack; HTTP serves only the health check and metrics."""
    web_app = web.Application()
    add_health_and_metrics(web_app, triage, link_health)
    return web_app

"""Slack in Socket Mode for the bot's tests: ``SlackStandIn``'s Web API (recorded, with its faults) plus
``apps.connections.open`` and the WebSocket links it hands out, served by aiohttp on 127.0.0.1.

What it plays, after Slack's Socket Mode documentation (docs.slack.dev/apis/events-api/using-socket-mode)
and what slack_sdk's Socket Mode clients expect:

* ``apps.connections.open`` takes the app-level token (``xapp-``) in the Authorization header only (a bot
  token gets ``not_allowed_token_type``) and answers ``{"ok": true, "url": "ws://…/link/?ticket=…&app_id=…"}``;
  each ticket opens one connection.
* On a new connection it sends ``hello`` (``num_connections``, ``debug_info``, ``connection_info``), then
  envelopes ``{"envelope_id", "type", "payload", "accepts_response_payload"}`` of type ``events_api``
  (with ``retry_attempt`` / ``retry_reason``), ``slash_commands`` or ``interactive``.
* The app acks each with ``{"envelope_id": …}``, plus ``"payload"`` only where
  ``accepts_response_payload`` is true, within 3 seconds. Every ack is checked; whatever breaks the
  protocol (unknown or repeated envelope_id, a payload where none is accepted, a late ack, a slash command
  answer that is no message) lands in ``protocol_errors``. An ``events_api`` envelope not acked in time is
  delivered again in a new envelope (``retry_attempt`` + 1, ``retry_reason`` "timeout") on the newest link,
  up to three times, as Slack does.
* ``disconnect`` with ``reason`` warning / refresh_requested (the app opens a new connection) /
  link_disabled (Socket Mode switched off; the stand-in closes that link).
* WebSocket pings are answered with pongs, unless a test stops that (``answer_pings``), and ``hello`` can
  be withheld from new links (``send_hello``): the two ways a link dies without an error.

    async with SocketModeStandIn() as slack:
        # bot configured with SLACK_APP_TOKEN=slack.app_token, SLACK_API_URL=slack.api_url
        await slack.wait_for_link()
        envelope = await slack.deliver_event(slack.message_event("C0SUPPORT", "U0CUSTOMER", "help"))
        [reply] = await slack.wait_for("chat.postMessage")
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.support.slack_standin import (
    JSON,
    SLACK_ACK_TIMEOUT_S,
    ApiCall,
    ApiError,
    SlackStandIn,
    WaitTimeout,
)

DEBUG_HOST = "applink-standin-1"
EVENT_RETRIES = 3  # Slack retries an unacknowledged event up to three times
# payload types of `interactive` envelopes whose ack may carry a response (errors, options, a new view)
RESPONDING_INTERACTIONS = frozenset({"view_submission", "block_suggestion"})
MESSAGE_RESPONSE_TYPES = frozenset({"ephemeral", "in_channel"})


@dataclass
class Ack:
    """One acknowledgement the app sent."""

    envelope_id: str
    payload: JSON | None
    link: int  # the number of the link it came over (it need not be the one the envelope went out on)
    after_s: float  # seconds from sending the envelope to receiving this ack
    raw: str


@dataclass
class Envelope:
    """One envelope as sent to the app, and the acks it got."""

    envelope_id: str
    type: str  # events_api, slash_commands or interactive
    payload: JSON
    accepts_response_payload: bool
    retry_attempt: int | None = None  # events_api only
    retry_reason: str | None = None
    link: int = 0  # the number of the link it went out on (0: not sent)
    sent_at: float = 0.0  # time.monotonic()
    acks: list[Ack] = field(default_factory=list)

    def message(self) -> JSON:
        message: JSON = {
            "envelope_id": self.envelope_id,
            "payload": self.payload,
            "type": self.type,
            "accepts_response_payload": self.accepts_response_payload,
        }
        if self.type == "events_api":
            message.update(
                {"retry_attempt": self.retry_attempt or 0, "retry_reason": self.retry_reason or ""}
            )
        return message

    @property
    def ack(self) -> Ack:
        if not self.acks:
            raise AssertionError(f"envelope {self.envelope_id} ({self.type}) was not acknowledged")
        return self.acks[0]


@dataclass
class Link:
    """One WebSocket connection the app opened with a ticket from apps.connections.open."""

    number: int  # 1, 2, … in the order opened
    ws: web.WebSocketResponse
    opened_at: float  # time.monotonic()
    answer_pings: bool
    hello_at: float | None = None
    closed_at: float | None = None
    pings: int = 0
    disconnects: list[str] = field(default_factory=list)  # reasons sent over this link

    @property
    def open(self) -> bool:
        return self.closed_at is None and not self.ws.closed


class SocketModeStandIn(SlackStandIn):
    """``SlackStandIn`` in Socket Mode. Recordings besides the Web API's: ``links``, ``envelopes`` (by id,
    in the order sent), ``acks``, ``protocol_errors``. Knobs: ``send_hello``, ``answer_pings`` (for new
    links; ``Link.answer_pings`` for an open one), ``ack_timeout``."""

    def __init__(self, *, app_token: str = "xapp-1-A0APP-1-standin", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app_token = app_token
        self.method_tokens["apps.connections.open"] = app_token
        self.register_method("apps.connections.open", self._apps_connections_open)
        self.send_hello = True
        self.answer_pings = True
        self.ack_timeout = SLACK_ACK_TIMEOUT_S
        self.links: list[Link] = []
        self.envelopes: dict[str, Envelope] = {}
        self.acks: list[Ack] = []
        self.protocol_errors: list[str] = []
        self._tickets: set[str] = set()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/link/", self._handle_link)

    async def close(self) -> None:
        for link in self.links:
            if link.open:
                await link.ws.close()
        await super().close()

    # ---- links --------------------------------------------------------------------------------------

    def _apps_connections_open(self, call: ApiCall) -> JSON:
        if not call.headers.get("Authorization", "").startswith("Bearer "):
            raise ApiError("not_authed")  # Slack takes the app-level token from the header only
        ticket = secrets.token_hex(16)
        self._tickets.add(ticket)
        base = self.api_url.removesuffix("/api/").replace("http://", "ws://", 1)
        return {"url": f"{base}/link/?ticket={ticket}&app_id={self.api_app_id}"}

    async def _handle_link(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        if ticket not in self._tickets:
            return web.Response(status=401, text="invalid or used ticket")
        self._tickets.discard(ticket)
        ws = web.WebSocketResponse(autoping=False)  # pings are answered here, so a test can stop that
        await ws.prepare(request)
        link = Link(len(self.links) + 1, ws, time.monotonic(), answer_pings=self.answer_pings)
        self.links.append(link)
        try:
            if self.send_hello:
                await ws.send_str(json.dumps(self._hello()))
                link.hello_at = time.monotonic()
            await self._notify()
            await self._serve(link)
        finally:
            link.closed_at = time.monotonic()
            await ws.close()
            await self._notify()
        return ws

    def _hello(self) -> JSON:
        return {
            "type": "hello",
            "num_connections": sum(1 for link in self.links if link.open),
            "debug_info": {"host": DEBUG_HOST, "build_number": 1, "approximate_connection_time": 18060},
            "connection_info": {"app_id": self.api_app_id},
        }

    async def _serve(self, link: Link) -> None:
        while True:
            message = await link.ws.receive()
            if message.type == WSMsgType.TEXT:
                await self._receive_ack(link, message.data)
            elif message.type == WSMsgType.PING:
                link.pings += 1
                if link.answer_pings:
                    await link.ws.pong(message.data)
                await self._notify()
            elif message.type == WSMsgType.PONG:
                continue
            elif message.type == WSMsgType.BINARY:
                self.protocol_errors.append(f"link {link.number}: a binary frame")
            else:  # CLOSE, CLOSING, CLOSED, ERROR
                return

    def current_link(self) -> Link | None:
        """The newest open link that got its hello: where Slack delivers."""
        ready = [link for link in self.links if link.open and link.hello_at is not None]
        return ready[-1] if ready else None

    async def wait_for_link(self, number: int | None = None, timeout: float = 10.0) -> Link:  # noqa: ASYNC109
        """Wait until link ``number`` (default: the next one not yet opened, or the first) is open and got
        its hello (or just is open, while ``send_hello`` is off)."""
        number = number or max(1, len(self.links))

        def ready() -> bool:
            if len(self.links) < number:
                return False
            link = self.links[number - 1]
            return link.hello_at is not None or not self.send_hello

        if not await self._wait(ready, timeout):
            raise WaitTimeout(f"waited {timeout}s for link {number}; links: {self._describe_links()}")
        return self.links[number - 1]

    async def wait_for_hello(self, after: int = 0, timeout: float = 10.0) -> Link:  # noqa: ASYNC109
        """Wait for the first link numbered above ``after`` that is open and got its hello."""

        def found() -> Link | None:
            return next((k for k in self.links[after:] if k.open and k.hello_at is not None), None)

        if not await self._wait(lambda: found() is not None, timeout):
            raise WaitTimeout(
                f"waited {timeout}s for a hello after link {after}; links: {self._describe_links()}"
            )
        link = found()
        assert link is not None
        return link

    def _describe_links(self) -> list[str]:
        return [
            f"#{link.number} {'open' if link.open else 'closed'} hello={link.hello_at is not None} "
            f"pings={link.pings} disconnects={link.disconnects}"
            for link in self.links
        ]

    async def disconnect(self, reason: str = "refresh_requested", link: Link | None = None) -> Link:
        """Send ``disconnect``: warning and refresh_requested leave the link open for the app to replace;
        link_disabled (Socket Mode switched off) is followed by closing it."""
        link = link or self.current_link()
        if link is None:
            raise AssertionError("no open link to disconnect")
        message = {"type": "disconnect", "reason": reason, "debug_info": {"host": DEBUG_HOST}}
        await link.ws.send_str(json.dumps(message))
        link.disconnects.append(reason)
        if reason == "link_disabled":
            await link.ws.close()
        return link

    # ---- envelopes ----------------------------------------------------------------------------------

    def envelope(
        self, type_: str, payload: JSON, *, retry_attempt: int = 0, retry_reason: str = ""
    ) -> Envelope:
        if type_ == "events_api":
            accepts, retry = False, (retry_attempt, retry_reason)
        elif type_ == "slash_commands":
            accepts, retry = True, (None, None)
        else:
            accepts, retry = payload.get("type") in RESPONDING_INTERACTIONS, (None, None)
        return Envelope(str(uuid.uuid4()), type_, payload, accepts, *retry)

    async def send(self, envelope: Envelope, link: Link | None = None) -> bool:
        """Send ``envelope`` over ``link`` (default: the current one); False if that link is gone."""
        link = link or self.current_link()
        if link is None or not link.open:
            return False
        envelope.link, envelope.sent_at = link.number, time.monotonic()
        self.envelopes[envelope.envelope_id] = envelope
        try:
            await link.ws.send_str(json.dumps(envelope.message()))
        except ConnectionError:
            return False
        return True

    async def deliver(self, envelope: Envelope, link: Link | None = None) -> Envelope:
        """Send ``envelope`` and wait for its ack. Events not acked in time are delivered again, as Slack
        does, in a new envelope on the newest link; returns the envelope that was acked."""
        attempts = EVENT_RETRIES + 1 if envelope.type == "events_api" else 1
        for attempt in range(attempts):
            if attempt:
                envelope = self.envelope(
                    envelope.type, envelope.payload, retry_attempt=attempt, retry_reason="timeout"
                )
                link = None
                await self._wait(lambda: self.current_link() is not None, self.ack_timeout)
            if await self.send(envelope, link) and await self._acked(envelope):
                return envelope
        raise WaitTimeout(
            f"{envelope.type} envelope not acknowledged after {attempts} deliveries; "
            f"links: {self._describe_links()}"
        )

    async def _acked(self, envelope: Envelope) -> bool:
        return await self._wait(lambda: bool(envelope.acks), self.ack_timeout)

    async def deliver_event(
        self,
        event: Mapping[str, Any],
        *,
        event_id: str | None = None,
        link: Link | None = None,
        retry_attempt: int = 0,
        retry_reason: str = "",
    ) -> Envelope:
        """An Events API event in its ``event_callback`` payload, in an ``events_api`` envelope."""
        payload = self.event_envelope(event, event_id=event_id)
        envelope = self.envelope(
            "events_api", payload, retry_attempt=retry_attempt, retry_reason=retry_reason
        )
        return await self.deliver(envelope, link)

    async def redeliver(
        self, envelope: Envelope, reason: str = "timeout", link: Link | None = None
    ) -> Envelope:
        """The same event again in a new envelope, as Slack retries one whose ack it did not get."""
        again = self.envelope(
            envelope.type,
            envelope.payload,
            retry_attempt=(envelope.retry_attempt or 0) + 1,
            retry_reason=reason,
        )
        return await self.deliver(again, link)

    async def deliver_command(self, command: str = "/classify", text: str = "", **fields: Any) -> Envelope:
        """A slash command (``command_payload``'s fields) in a ``slash_commands`` envelope."""
        payload = self.command_payload(command, text, **fields)
        return await self.deliver(self.envelope("slash_commands", dict(payload)))

    async def deliver_block_actions(self, actions: Iterable[Mapping[str, Any]], **fields: Any) -> Envelope:
        """A ``block_actions`` payload (``block_actions_payload``) in an ``interactive`` envelope."""
        payload = self.block_actions_payload(actions, **fields)
        return await self.deliver(self.envelope("interactive", payload))

    # ---- acks ---------------------------------------------------------------------------------------

    async def _receive_ack(self, link: Link, raw: str) -> None:
        problem, ack = self._check_ack(link, raw)
        if problem is not None:
            self.protocol_errors.append(f"link {link.number}: {problem}: {raw[:200]}")
        if ack is not None:
            self.acks.append(ack)
            self.envelopes[ack.envelope_id].acks.append(ack)
        await self._notify()

    def _check_ack(self, link: Link, raw: str) -> tuple[str | None, Ack | None]:
        try:
            message = json.loads(raw)
        except json.JSONDecodeError:
            return "an ack that is not JSON", None
        if not isinstance(message, dict) or not isinstance(message.get("envelope_id"), str):
            return "an ack without an envelope_id", None
        envelope = self.envelopes.get(message["envelope_id"])
        if envelope is None:
            return "an ack of an unknown envelope_id", None
        payload = message.get("payload")
        ack = Ack(envelope.envelope_id, payload, link.number, time.monotonic() - envelope.sent_at, raw)
        if set(message) - {"envelope_id", "payload"}:
            return f"unexpected fields {sorted(set(message) - {'envelope_id', 'payload'})}", ack
        if envelope.acks:
            return "a second ack of one envelope", ack
        if ack.after_s > self.ack_timeout:
            return f"an ack after {ack.after_s:.1f}s (Slack waits {self.ack_timeout}s)", ack
        if payload is None:
            return None, ack
        if not envelope.accepts_response_payload:
            return f"a payload in the ack of an {envelope.type} envelope, which accepts none", ack
        if envelope.type == "slash_commands":
            return _message_problem(payload), ack
        return (None if isinstance(payload, dict) else "a payload that is not an object"), ack

    def unanswered(self) -> list[Envelope]:
        """Envelopes sent and never acknowledged."""
        return [envelope for envelope in self.envelopes.values() if not envelope.acks]


def _message_problem(payload: Any) -> str | None:
    """What is wrong with a slash command's ack payload as a message (None: nothing)."""
    if not isinstance(payload, dict):
        return "a response payload that is not an object"
    if not (isinstance(payload.get("text"), str) and payload["text"]) and not isinstance(
        payload.get("blocks"), list
    ):
        return "a response payload with neither text nor blocks"
    if "response_type" in payload and payload["response_type"] not in MESSAGE_RESPONSE_TYPES:
        return f"response_type {payload['response_type']!r}"
    return None

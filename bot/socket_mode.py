"""Socket Mode: Bolt's handler behind a liveness watchdog, and the link's state for ``/healthz``.

slack_sdk's client reconnects when Slack sends ``disconnect`` or the socket closes, but a link can also die
quietly: after an idle reconnect the client has been seen holding a new session on which no ``hello`` and
no event ever arrives, with no error anywhere (bolt-python issue 1529). So the watchdog asks for proof of
life: a ``hello`` within ``dead_after_s`` of every new connection, and after it something heard (a pong to
the client's pings, or any message) at least every ``dead_after_s``. When that fails it drops the whole
handler and starts a fresh one: new aiohttp session, new tasks, new URL from ``apps.connections.open``.
Envelopes the old link never acknowledged are delivered again by Slack and stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from aiohttp import WSMessage
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0  # a dead link's close handshake is not waited for longer
SMALL_FRAME = 4096  # hello and disconnect are small; envelopes are not parsed twice just to find them


class LinkState(StrEnum):
    CONNECTING = "connecting"  # no hello on the current connection yet
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # Slack sent disconnect, or the watchdog found the link dead
    CLOSED = "closed"


class SocketModeLink:
    """One Socket Mode connection to Slack that is kept alive: ``start()``, ``health()``, ``close()``."""

    def __init__(self, app: AsyncApp, app_token: str, *, ping_interval_s: float, dead_after_s: float) -> None:
        self._app = app
        self._app_token = app_token
        self._ping_interval_s = ping_interval_s
        self._dead_after_s = dead_after_s
        self._check_every_s = min(ping_interval_s, dead_after_s / 4)
        self._handler = self._new_handler()
        self._state = LinkState.CONNECTING
        self._state_since = time.monotonic()
        self._why: str | None = "connecting"  # why the link is not connected, for /healthz
        self._session: Any = None  # the client's current WebSocket, as last observed
        self._hello_session: Any = None  # the WebSocket the last hello came over
        self._waiting_since: float | None = time.monotonic()  # waiting for a hello since then
        self._heard_at = time.monotonic()
        self.connections = 0  # hellos received: every connection that became usable
        self.reconnects = 0  # handlers the watchdog replaced
        self.last_problem: str | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._connecting: asyncio.Future[Any] | None = None
        self._retired: set[asyncio.Task[None]] = set()
        # called on every hello after the first: events sent while the link was down are not redelivered
        self.on_reconnect: Callable[[], None] | None = None

    async def start(self) -> None:
        """Connect (returns once the WebSocket is open; the hello may follow) and start watching."""
        await self._handler.connect_async()
        self._watchdog = asyncio.ensure_future(self._watch())

    async def close(self) -> None:
        self._set(LinkState.CLOSED, "shutting down")
        for task in (self._watchdog, self._connecting):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._close_handler(self._handler)
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """For ``/healthz``: healthy only while connected, with the state and what is wrong."""
        self._observe()
        return self._state == LinkState.CONNECTED, {
            "socket_mode": {
                "state": str(self._state),
                "for_s": round(time.monotonic() - self._state_since, 1),
                "why": self._why,
                "connections": self.connections,
                "reconnects": self.reconnects,
                "last_problem": self.last_problem,
            }
        }

    # ---- the watchdog ------------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._check_every_s)
            try:
                problem = self._observe()
                if problem is not None:
                    self._replace_handler(problem)
            except Exception:  # the watchdog must outlive whatever goes wrong in one check
                log.exception("Socket Mode watchdog check failed")

    def _observe(self) -> str | None:
        """Bring the state up to date with the client's; return what makes the link dead, if it is."""
        if self._state == LinkState.CLOSED:
            return None
        now = time.monotonic()
        session = self._handler.client.current_session
        if session is not self._session:  # the client opened a new connection (or dropped its last)
            self._session = session
            if session is None or session is not self._hello_session:
                self._await_hello(now, LinkState.CONNECTING, "waiting for Slack's hello")
        elif session is None or session.closed:
            self._await_hello(now, LinkState.RECONNECTING, "the connection closed; reconnecting")
        if self._waiting_since is not None:
            if now - self._waiting_since <= self._dead_after_s:
                return None
            if session is None or session.closed:
                return f"no connection for {self._dead_after_s:g}s (the client did not reconnect)"
            return f"no hello from Slack within {self._dead_after_s:g}s of connecting"
        # aiohttp's heartbeat usually closes a link that stops answering pings first; this also catches a
        # client that stopped pinging (and so stopped checking) altogether
        silent_s = min(now - self._heard_at, self._pong_age_s())
        if silent_s > self._dead_after_s:
            return f"nothing heard from Slack (no pong, no message) for {silent_s:.1f}s"
        return None

    def _pong_age_s(self) -> float:
        # the client records the send time of the newest ping Slack answered (wall clock)
        answered = self._handler.client.last_ping_pong_time
        return float("inf") if answered is None else max(0.0, time.time() - answered)

    def _await_hello(self, now: float, state: LinkState, why: str) -> None:
        if self._waiting_since is None:
            self._waiting_since = now
        if self._state == LinkState.CONNECTED:
            self._set(state, why)

    def _replace_handler(self, problem: str) -> None:
        log.warning("Socket Mode link is dead (%s); opening a new one", problem)
        self.reconnects += 1
        self.last_problem = problem
        old, self._handler = self._handler, self._new_handler()
        self._retire(old)
        self._session = self._hello_session = None
        self._waiting_since = time.monotonic()
        self._set(LinkState.RECONNECTING, problem)
        # never awaited here: connecting may hang as long as the link is dead; the next check sees it
        self._connecting = asyncio.ensure_future(self._handler.connect_async())

    def _retire(self, handler: AsyncSocketModeHandler) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        task = asyncio.ensure_future(self._close_handler(handler))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def _close_handler(self, handler: AsyncSocketModeHandler) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(handler.close_async(), timeout=CLOSE_TIMEOUT_S)

    # ---- what arrives over the link ----------------------------------------------------------------

    def _new_handler(self) -> AsyncSocketModeHandler:
        handler = AsyncSocketModeHandler(self._app, self._app_token, ping_interval=self._ping_interval_s)
        client = handler.client

        async def on_frame(message: WSMessage) -> None:  # every text frame, before the client's queue
            if client is self._handler.client:
                self._on_frame(message)

        client.on_message_listeners.append(on_frame)
        return handler

    def _on_frame(self, message: WSMessage) -> None:
        self._heard_at = time.monotonic()
        data = message.data
        if not isinstance(data, str) or len(data) > SMALL_FRAME:
            return
        with contextlib.suppress(ValueError):
            frame = json.loads(data)
            kind = frame.get("type") if isinstance(frame, dict) else None
            if kind == "hello":
                self._hello_session = self._session = self._handler.client.current_session
                self._waiting_since = None
                self.connections += 1
                self._set(LinkState.CONNECTED, None)
                if self.connections > 1 and self.on_reconnect is not None:
                    self.on_reconnect()
            elif kind == "disconnect":
                self._waiting_since = self._waiting_since or time.monotonic()
                self._set(LinkState.RECONNECTING, f"Slack sent disconnect ({frame.get('reason')})")

    def _set(self, state: LinkState, why: str | None) -> None:
        if state != self._state:
            log.info("Socket Mode link %s%s", state, f": {why}" if why else "")
            self._state, self._state_since = state, time.monotonic()
        self._why = why

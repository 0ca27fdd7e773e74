"""Backfill: triage what was posted, replied and edited while the bot could not hear it.

Slack gives up redelivering an event after three retries, so at start-up and after every Socket Mode
reconnect the bot reads ``conversations.history`` of each triage channel ``TRIAGE_BACKFILL_HOURS`` back,
page by page with Slack's cursor, and hands what it missed to the paths live events take:

* a top-level message it has not stored: triaged as a new message;
* a stored message whose text was edited since (Slack marks it ``edited``): as ``message_changed``;
  a stored thread parent deleted since (history lists its ``tombstone``): as ``message_deleted``;
* a triaged thread whose ``latest_reply`` is newer than the newest reply the bot heard there before it
  started listening again (stored, or its own reply) and where someone besides the bot replied: its
  replies since then (``conversations.replies``) as live thread replies, and the stored ones edited since
  as edits. A reply heard live since the bot came back does not count: one missed before it would hide
  behind it.

History lists no replies, hence the reads of the threads with news (only those: Slack limits
``conversations.replies`` hardest). The client waits out Slack's 429s (``make_web_client``). A message is
stored once per (team, channel, ts) and an edit is applied only while the stored text differs, so what
arrives both live and here is handled once, and a second backfill finds nothing to do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse

from bot.app import is_new_customer_message
from bot.lifecycle import MessageLife
from bot.storage import repository as repo
from bot.storage.models import utcnow
from bot.triage import IncomingMessage, Triage

log = logging.getLogger(__name__)

PAGE_SIZE = 200  # listings allow up to 999 or 1000; Slack recommends no more than 200


class Backfill:
    def __init__(
        self,
        triage: Triage,
        client: AsyncWebClient,
        *,
        team_id: str,
        bot_user_id: str,
        bot_id: str,
    ):
        self.triage = triage
        self.life = MessageLife(triage)
        self.client = client
        self.settings = triage.settings
        self.team_id = team_id
        self.context = {"bot_user_id": bot_user_id, "bot_id": bot_id}  # as Bolt's context has them
        self._lock = asyncio.Lock()
        self.runs = 0  # finished runs (for tests and logs)

    async def run(self, listening_since: datetime | None = None) -> int:
        """Backfill every triage channel once; returns how many messages it handled. One run at a time.

        ``listening_since``: when live events began to arrive again (start-up, a reconnect; default now)."""
        since = listening_since or utcnow()
        if self.settings.triage_backfill_hours <= 0:
            return 0
        async with self._lock:
            handled = 0
            try:
                channels = await self.channels()
            except SlackApiError as exc:  # e.g. an install from before the channels:read scope
                log.warning(
                    "backfill: cannot list the bot's channels (users.conversations: %s); set TRIAGE_CHANNELS "
                    "or add the channels:read and groups:read scopes",
                    exc.response.get("error"),
                )
                channels = []
            for channel in channels:
                try:
                    handled += await self.channel(channel, since)
                except SlackApiError as exc:  # one channel the bot cannot read must not stop the others
                    log.warning("backfill of %s failed: %s", channel, exc.response.get("error"))
            self.runs += 1
        if handled:
            log.info(
                "backfill: %d message(s) posted or edited while the bot was away are being triaged", handled
            )
        return handled

    async def run_logged(self, listening_since: datetime | None = None) -> None:
        """``run`` for a background task: failures are logged (the next start or reconnect tries again)."""
        try:
            await self.run(listening_since)
        except Exception:
            log.exception("backfill failed")

    async def channels(self) -> list[str]:
        """TRIAGE_CHANNELS, or else every channel the bot is a member of (``users.conversations``)."""
        if self.settings.triage_channels:
            return list(self.settings.triage_channels)
        found = await _all_pages(
            self.client.users_conversations,
            "channels",
            types="public_channel,private_channel",
            exclude_archived=True,
        )
        return [str(c["id"]) for c in found if c.get("id") and self.settings.watches(str(c["id"]))]

    async def channel(self, channel: str, listening_since: datetime) -> int:
        """Triage what the channel has that the bot missed; returns how many messages it handled."""
        horizon = f"{time.time() - self.settings.triage_backfill_hours * 3600:.6f}"  # Slack's ts, exactly
        async with self.triage.sessions() as session:
            known = await repo.stored_since(session, self.team_id, channel, horizon)
        stored = {m.ts: m.thread_ts for m in known}
        heard = _newest_replies(known, before=listening_since)
        handled = 0
        for message in _oldest_first(
            await _all_pages(self.client.conversations_history, "messages", channel=channel, oldest=horizon)
        ):
            handled += await self._caught_up(channel, message, stored)
            parent = message["ts"]
            if (
                parent in stored
                and _is_newer(message.get("latest_reply"), heard.get(parent, parent))
                and self._others_replied(message)
            ):
                try:
                    handled += await self._thread(channel, parent, heard.get(parent, parent), stored)
                except SlackApiError as exc:  # one thread (deleted meanwhile, say) must not stop the rest
                    log.warning(
                        "backfill of thread %s in %s failed: %s", parent, channel, exc.response.get("error")
                    )
        return handled

    def _others_replied(self, parent: dict[str, Any]) -> bool:
        """Whether someone besides the bot replied in the thread (``reply_users`` may name its bot id)."""
        users = parent.get("reply_users")
        own = {self.context["bot_user_id"], self.context["bot_id"]}
        return not isinstance(users, list) or any(user not in own for user in users)

    async def _thread(self, channel: str, parent: str, oldest: str, stored: dict[str, str | None]) -> int:
        """The replies in a triaged thread after ``oldest`` (the parent comes first on every page)."""
        replies = await _all_pages(
            self.client.conversations_replies, "messages", channel=channel, ts=parent, oldest=oldest
        )
        return sum(
            [await self._caught_up(channel, m, stored) for m in _oldest_first(replies) if m["ts"] != parent]
        )

    async def _caught_up(self, channel: str, message: dict[str, Any], stored: dict[str, str | None]) -> int:
        """Hand one listed message to the live path for what the bot missed of it: 1 if it did."""
        if message["ts"] in stored:
            if message.get("subtype") == "tombstone":  # what a deleted thread parent leaves in history
                return int(await self.life.deleted(self.team_id, channel, message["ts"]))
            # edited while the bot was away, or long before: it applies only while the stored text differs
            return int(bool(message.get("edited")) and await self.life.edited(self.team_id, channel, message))
        event = {**message, "channel": channel}
        if event.get("thread_ts") == event["ts"]:
            del event["thread_ts"]  # a parent as history lists it: the event of its posting had none
        if not await self._triage(event):
            return 0
        stored[event["ts"]] = event.get("thread_ts")  # its thread's replies are read next
        return 1

    async def _triage(self, event: dict[str, Any]) -> bool:
        """The message through the path its live event takes; ``False``: not one the bot triages."""
        if await self.life.handle({"team_id": self.team_id}, event, self.context):  # replies, form posts
            return True
        if not is_new_customer_message(event) or event.get("user") == self.context["bot_user_id"]:
            return False
        text = event.get("text")
        await self.triage.on_message(
            IncomingMessage(
                team_id=self.team_id,
                channel_id=event["channel"],
                ts=event["ts"],
                user_id=event.get("user"),
                text=text if isinstance(text, str) else "",
            )
        )
        return True


async def _all_pages(
    read: Callable[..., Awaitable[AsyncSlackResponse]], key: str, **args: Any
) -> list[dict[str, Any]]:
    """Every item under ``key`` of a cursor-paged Web API listing, page after page."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page = await read(limit=PAGE_SIZE, cursor=cursor, **args)
        items += [item for item in page.get(key) or [] if isinstance(item, dict)]
        cursor = (page.get("response_metadata") or {}).get("next_cursor") or None
        if not cursor:
            return items


def _oldest_first(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Listed messages with a ts, oldest first (history pages newest first)."""
    return sorted((m for m in messages if _ts(m.get("ts")) is not None), key=lambda m: _ts(m["ts"]) or 0.0)


def _newest_replies(known: list[repo.Heard], before: datetime) -> dict[str, str]:
    """The ts of the newest reply the bot heard in each thread before ``before`` (a stored one, or its
    own), by thread."""
    newest: dict[str, str] = {}
    cut = before.timestamp()

    def heard(thread: str, ts: str) -> None:
        if float(newest.get(thread, thread)) < float(ts) < cut:
            newest[thread] = ts

    for message in known:
        if message.thread_ts is not None and message.thread_ts != message.ts and message.received_at < before:
            heard(message.thread_ts, message.ts)
        if message.own_reply_ts is not None:
            heard(message.thread_ts or message.ts, message.own_reply_ts)
    return newest


def _is_newer(ts: Any, than: str) -> bool:
    value = _ts(ts)
    return value is not None and value > float(than)


def _ts(value: Any) -> float | None:
    """A Slack ts as a number, or ``None`` for anything else (a payload is validated before it is used)."""
    if not isinstance(value, str):
        return None
    try:
        return float(value)
    except ValueError:
        return None

"""Backfill: triage what was posted while the bot could not hear it.

Slack gives up redelivering an event after three retries, so at start-up and after every Socket Mode
reconnect the bot reads ``conversations.history`` of each triage channel since the newest message it
stored there (at most ``TRIAGE_BACKFILL_HOURS`` back), page by page with Slack's cursor, and hands each
message to the same paths live events take. A message already stored is not stored or answered again:
the (team, channel, ts) key decides, whichever of the event and the backfill comes first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.app import is_new_customer_message
from bot.lifecycle import MessageLife
from bot.storage import repository as repo
from bot.triage import IncomingMessage, Triage

log = logging.getLogger(__name__)

PAGE_SIZE = 200  # conversations.history allows up to 999; Slack recommends no more than 200


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

    async def run(self) -> int:
        """Backfill every triage channel once; returns how many messages it stored. One run at a time."""
        if self.settings.triage_backfill_hours <= 0:
            return 0
        async with self._lock:
            stored = 0
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
                    stored += await self.channel(channel)
                except SlackApiError as exc:  # one channel the bot cannot read must not stop the others
                    log.warning("backfill of %s failed: %s", channel, exc.response.get("error"))
            self.runs += 1
        if stored:
            log.info("backfill: %d message(s) posted while the bot was away are being triaged", stored)
        return stored

    async def run_logged(self) -> None:
        """``run`` for a background task: failures are logged (the next start or reconnect tries again)."""
        try:
            await self.run()
        except Exception:
            log.exception("backfill failed")

    async def channels(self) -> list[str]:
        """TRIAGE_CHANNELS, or else every channel the bot is a member of (``users.conversations``)."""
        if self.settings.triage_channels:
            return list(self.settings.triage_channels)
        found: list[str] = []
        cursor: str | None = None
        while True:
            page = await self.client.users_conversations(
                types="public_channel,private_channel", exclude_archived=True, limit=PAGE_SIZE, cursor=cursor
            )
            found += [str(c["id"]) for c in page.get("channels") or [] if isinstance(c, dict) and c.get("id")]
            cursor = (page.get("response_metadata") or {}).get("next_cursor") or None
            if not cursor:
                return [c for c in found if self.settings.watches(c)]

    async def channel(self, channel: str) -> int:
        """Triage what the channel has since the newest message stored from it; returns how many were new."""
        bound = time.time() - self.settings.triage_backfill_hours * 3600
        async with self.triage.sessions() as session:
            newest = await repo.newest_top_level_ts(session, self.team_id, channel)
        oldest = newest if newest and float(newest) > bound else f"{bound:.6f}"  # Slack's ts, exactly
        return sum([await self._triage(channel, m) for m in await self._history(channel, oldest)])

    async def _history(self, channel: str, oldest: str) -> list[dict[str, Any]]:
        """Every message after ``oldest``, oldest first (Slack pages newest first)."""
        messages: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            page = await self.client.conversations_history(
                channel=channel, oldest=oldest, limit=PAGE_SIZE, cursor=cursor
            )
            messages += [
                m for m in page.get("messages") or [] if isinstance(m, dict) and isinstance(m.get("ts"), str)
            ]
            cursor = (page.get("response_metadata") or {}).get("next_cursor") or None
            if not cursor or not page.get("has_more", True):
                return sorted(messages, key=lambda m: float(m["ts"]))

    async def _triage(self, channel: str, message: dict[str, Any]) -> int:
        event = {**message, "channel": channel}
        body = {"team_id": self.team_id}
        async with self.triage.sessions() as session:
            if await repo.get_message(session, self.team_id, channel, event["ts"]) is not None:
                return 0  # heard live, or backfilled before
        if await self.life.handle(body, event, self.context):  # Workflow Builder posts, thread broadcasts
            return 1
        if not is_new_customer_message(event) or event.get("user") == self.context["bot_user_id"]:
            return 0
        text = event.get("text")
        await self.triage.on_message(
            IncomingMessage(
                team_id=self.team_id,
                channel_id=channel,
                ts=event["ts"],
                user_id=event.get("user"),
                text=text if isinstance(text, str) else "",
                thread_ts=event.get("thread_ts"),
            )
        )
        return 1

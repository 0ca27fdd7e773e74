"""Everything the bot writes to Slack goes through here: one client, one pacing, one retry and error policy.

* Retry: the Web API client retries what Slack documents as transient (429 after ``Retry-After``, 5xx,
  dropped connections); see ``make_web_client``.
* Pacing: Slack allows about one post per second per channel; posts wait their turn per channel.
* Errors: most output is best effort (a failed reaction or edit is logged with its context and the caller
  goes on); a post whose failure matters to the caller (``post_or_raise``) raises ``SlackApiError`` and
  ``is_permanent`` says whether trying again can help.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot.settings import BotSettings

log = logging.getLogger(__name__)

# chat.postMessage errors that no retry can cure: the message is skipped (and says why) instead
UNPOSTABLE = frozenset(
    {
        "channel_not_found",
        "not_in_channel",
        "is_archived",
        "restricted_action",
        "invalid_blocks",
        "msg_too_long",
    }
)
# Web API calls in flight at once over the shared keep-alive connections (more wait for a free one)
SLACK_CONNECTIONS = 64
SLACK_TIMEOUT_S = 30.0  # one Web API call at most (slack_sdk's own default)
# arguments worth naming when a call fails (never text or blocks: they may quote customers)
_CONTEXT_ARGS = ("channel", "timestamp", "ts", "name", "user")


def slack_session() -> aiohttp.ClientSession:
    """The HTTP session of the bot's Web API clients: kept-alive connections reused by every call (without
    one, slack_sdk opens a connection, TLS included, for each call). Made inside the running loop; whoever
    makes it closes it."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=SLACK_CONNECTIONS),
        timeout=aiohttp.ClientTimeout(total=SLACK_TIMEOUT_S),  # slack_sdk's timeout is for its own sessions
    )


def make_web_client(
    settings: BotSettings, retry: bool = True, session: aiohttp.ClientSession | None = None
) -> AsyncWebClient:
    """Web API client with Slack's documented retry rules: 429 waits Retry-After, 5xx and resets retry
    (``retry=False``: none, for a caller with its own retry loop). Its calls go over ``session``'s
    connections (``slack_session``); without one, each call opens its own."""
    handlers = [
        AsyncConnectionErrorRetryHandler(max_retry_count=2),
        AsyncRateLimitErrorRetryHandler(max_retry_count=5),
        AsyncServerErrorRetryHandler(max_retry_count=2),
    ]
    return AsyncWebClient(
        token=settings.slack_bot_token.get_secret_value(),
        base_url=settings.slack_api_url,
        retry_handlers=handlers if retry else [],
        session=session,
    )


def is_permanent(exc: SlackApiError) -> bool:
    """Whether a failed post can never succeed as asked (no retry can help)."""
    return exc.response.get("error") in UNPOSTABLE


class ChannelPacer:
    """Slack allows about one message per second per channel: space our posts out per channel."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self._next: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def wait(self, channel: str) -> None:
        lock = self._locks.setdefault(channel, asyncio.Lock())
        async with lock:
            now = time.monotonic()
            delay = self._next.get(channel, 0.0) - now
            if delay > 0:
                await asyncio.sleep(delay)
            self._next[channel] = max(now, self._next.get(channel, 0.0)) + self.interval_s


class SlackOutput:
    """The bot's Web API writes. Best-effort methods return Slack's answer, or ``None`` when it failed."""

    def __init__(self, client: AsyncWebClient, pacer: ChannelPacer | None = None):
        self.client = client
        self.pacer = pacer or ChannelPacer()

    # ---- messages -----------------------------------------------------------------------------------
    async def post_or_raise(
        self,
        channel: str,
        text: str,
        *,
        blocks: list[dict[str, Any]] | None = None,
        thread_ts: str | None = None,
        metadata: dict[str, Any] | None = None,
        paced: bool = True,
    ) -> dict[str, Any]:
        """A paced ``chat.postMessage`` without link previews; a refusal raises ``SlackApiError``.
        ``metadata``: Slack message metadata (``event_type``, ``event_payload``); ``paced=False`` when the
        caller waited for the channel's turn itself."""
        if paced:
            await self.pacer.wait(channel)
        posted = await self.client.chat_postMessage(
            channel=channel,
            thread_ts=thread_ts,
            text=text,
            blocks=blocks,
            unfurl_links=False,
            unfurl_media=False,
            **({"metadata": metadata} if metadata else {}),
        )
        return dict(posted.data)  # type: ignore[arg-type]

    async def find_own_post(
        self, *, event_type: str, message_id: int, bot_user_id: str | None, **listing: Any
    ) -> str | None:
        """The ts of a post this bot made carrying metadata ``event_type`` that names ``message_id``, or
        ``None``: how an attempt recognises what an earlier one posted before it died unrecorded.

        ``listing``: ``conversations.replies`` arguments (``channel``, ``ts``: a thread), or else
        ``conversations.history`` ones (``channel``, ``oldest``: a channel's recent posts), read page by
        page. A read that fails raises ``SlackApiError``: the caller waits rather than post blind."""
        read = self.client.conversations_replies if "ts" in listing else self.client.conversations_history
        cursor: str | None = None
        while True:
            page = await read(include_all_metadata=True, limit=200, cursor=cursor, **listing)
            for candidate in page.get("messages") or []:
                metadata = candidate.get("metadata") or {}
                names = (metadata.get("event_payload") or {}).get("message_id") == message_id
                ours = bot_user_id is None or candidate.get("user") == bot_user_id
                if ours and names and metadata.get("event_type") == event_type:
                    return str(candidate["ts"])
            cursor = (page.get("response_metadata") or {}).get("next_cursor") or None
            if cursor is None:
                return None

    async def post(
        self,
        channel: str,
        text: str,
        *,
        blocks: list[dict[str, Any]] | None = None,
        thread_ts: str | None = None,
    ) -> dict[str, Any] | None:
        """A paced, best-effort ``chat.postMessage``."""
        try:
            return await self.post_or_raise(channel, text, blocks=blocks, thread_ts=thread_ts)
        except SlackApiError as exc:
            self._failed("chat.postMessage", exc, channel=channel)
            return None

    async def post_text(self, channel: str, text: str, thread_ts: str | None) -> str | None:
        """``post`` for callers that only need the ts (the retraining relay's progress lines)."""
        await self.pacer.wait(channel)
        try:  # as before: the relay's messages keep Slack's default link previews
            posted = await self.client.chat_postMessage(channel=channel, text=text, thread_ts=thread_ts)
        except SlackApiError as exc:
            self._failed("chat.postMessage", exc, channel=channel)
            return None
        return str(posted.get("ts"))

    async def update(
        self, channel: str, ts: str, text: str, *, blocks: list[dict[str, Any]] | None = None
    ) -> dict[str, Any] | None:
        return await self._call(
            "chat.update", self.client.chat_update, channel=channel, ts=ts, text=text, blocks=blocks
        )

    async def delete(self, channel: str, ts: str) -> dict[str, Any] | None:
        return await self._call("chat.delete", self.client.chat_delete, channel=channel, ts=ts)

    async def ephemeral(
        self, channel: str, user: str, text: str, *, blocks: list[dict[str, Any]] | None = None
    ) -> dict[str, Any] | None:
        """A note only ``user`` sees in ``channel``."""
        return await self._call(
            "chat.postEphemeral",
            self.client.chat_postEphemeral,
            channel=channel,
            user=user,
            text=text,
            blocks=blocks,
        )

    async def permalink(self, channel: str, ts: str) -> str | None:
        answer = await self._call(
            "chat.getPermalink", self.client.chat_getPermalink, channel=channel, message_ts=ts
        )
        return str(answer["permalink"]) if answer else None

    # ---- reactions, views, files --------------------------------------------------------------------
    async def react(self, channel: str, ts: str, name: str) -> dict[str, Any] | None:
        return await self._call(
            "reactions.add", self.client.reactions_add, channel=channel, timestamp=ts, name=name
        )

    async def open_view(self, trigger_id: str, view: dict[str, Any]) -> dict[str, Any] | None:
        return await self._call("views.open", self.client.views_open, trigger_id=trigger_id, view=view)

    async def update_view(self, view_id: str, view: dict[str, Any]) -> dict[str, Any] | None:
        return await self._call("views.update", self.client.views_update, view_id=view_id, view=view)

    async def publish_view(self, user_id: str, view: dict[str, Any]) -> dict[str, Any] | None:
        """``user_id``'s App Home tab."""
        return await self._call("views.publish", self.client.views_publish, user_id=user_id, view=view)

    async def upload(self, channel: str, path: str, title: str) -> None:
        try:
            await self.client.files_upload_v2(channel=channel, file=path, title=title)
        except (SlackApiError, OSError) as exc:
            log.warning("uploading %s to %s failed: %s", path, channel, exc)

    # ---- the error policy ---------------------------------------------------------------------------
    async def _call(
        self, what: str, method: Callable[..., Awaitable[Any]], /, **kwargs: Any
    ) -> dict[str, Any] | None:
        """A Web API call whose failure is logged with context and does not stop the caller."""
        try:
            answer = await method(**kwargs)
        except SlackApiError as exc:
            self._failed(what, exc, **kwargs)
            return None
        return dict(answer.data)

    @staticmethod
    def _failed(what: str, exc: SlackApiError, **kwargs: Any) -> None:
        context = {k: v for k, v in kwargs.items() if k in _CONTEXT_ARGS}
        log.warning("%s failed (%s) for %s", what, exc.response.get("error"), context)

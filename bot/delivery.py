"""Where triage shows up for a message: a card in the internal channel, a reply in its thread, or nowhere.

The settings say it (``TRIAGE_DELIVERY``, ``TRIAGE_CHANNEL_DELIVERY``); a channel shared with another
organization (Slack Connect: ``conversations.info`` → ``is_ext_shared``) is stricter whatever they say:
customers there never see triage labels, reactions, menus or hints, so ``thread`` becomes ``card`` when a
card channel exists and ``silent`` otherwise. So is a message whose author is a guest of the workspace (a
customer invited to internal channels: ``Agents.sees_machinery``), wherever it is posted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.settings import BotSettings, Delivery

if TYPE_CHECKING:
    from bot.agents import Agents

log = logging.getLogger(__name__)

SHARED_TTL_S = 600.0  # a channel that becomes shared is treated as such within ten minutes
LOOKUP_TIMEOUT_S = 10.0


def is_external(channel: dict[str, Any]) -> bool:
    """Shared with another organization, or about to be (an invitation is pending)."""
    return bool(channel.get("is_ext_shared") or channel.get("is_pending_ext_shared"))


class DeliveryPolicy:
    def __init__(
        self,
        settings: BotSettings,
        client: AsyncWebClient,
        agents: Agents | None = None,
        ttl_s: float = SHARED_TTL_S,
    ):
        self.settings = settings
        self.client = client
        self.agents = agents  # None: authors are not told apart (only the channel counts)
        self.ttl_s = ttl_s
        self._shared: dict[str, tuple[bool, float]] = {}  # channel id -> (shared?, when to look again)

    async def mode_for(self, channel_id: str, authors: Iterable[str | None] = ()) -> Delivery:
        """How triage of a message by ``authors`` (its own, and its thread's first message's for a reply)
        shows up in ``channel_id``."""
        mode = self.settings.delivery_for(channel_id)
        if mode == Delivery.THREAD and (await self.is_shared(channel_id) or await self._outsiders(authors)):
            return Delivery.CARD if self.settings.triage_card_channel else Delivery.SILENT
        return mode

    async def _outsiders(self, authors: Iterable[str | None]) -> bool:
        """Whether any author is a guest, who must not see labels (a Workflow Builder post has no author)."""
        if self.agents is None:
            return False
        for author in authors:
            if author and not await self.agents.sees_machinery(author):
                return True
        return False

    async def is_shared(self, channel_id: str) -> bool:
        """Whether customers of another organization read ``channel_id``. A look-up that fails says yes
        (and is not cached): triage stays out of a channel it cannot vouch for."""
        known = self._shared.get(channel_id)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        try:
            answer = await asyncio.wait_for(
                self.client.conversations_info(channel=channel_id), LOOKUP_TIMEOUT_S
            )
        except (SlackApiError, TimeoutError, OSError) as exc:
            detail = exc.response.get("error") if isinstance(exc, SlackApiError) else type(exc).__name__
            log.warning(
                "conversations.info for %s failed (%s): treated as shared with customers", channel_id, detail
            )
            return True
        shared = is_external(answer.get("channel") or {})
        self._shared[channel_id] = (shared, time.monotonic() + self.ttl_s)
        return shared


async def missing_invites(settings: BotSettings, client: AsyncWebClient) -> list[str]:
    """One line per channel the bot posts to but is not a member of (``conversations.info``)."""
    missing = []
    for channel_id, names in settings.own_channels.items():
        try:
            answer = await client.conversations_info(channel=channel_id)
        except SlackApiError as exc:  # a private channel the bot was never invited to is "not found"
            reason = str(exc.response.get("error"))
        else:
            if (answer.get("channel") or {}).get("is_member"):
                continue
            reason = "not a member"
        setting = " and ".join(names)
        missing.append(f"{setting} {channel_id}: {reason}; invite the bot there (/invite in that channel)")
    return missing

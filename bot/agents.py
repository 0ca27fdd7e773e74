"""Who counts as an agent: the people who may see the bot's internals (``/triage status``, ``models``).

Until agents are configured explicitly, an agent is a member of the bot's own workspace who is not a
guest: ``users.info`` names the person's home team (someone from another organization in a shared
channel has theirs) and marks guests ``is_restricted`` / ``is_ultra_restricted``. Triage admins always
are. Lookups are cached, so a command answers within Slack's three seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

log = logging.getLogger(__name__)

CACHE_TTL_S = 600.0  # a guest promoted to member (or a member demoted) is seen within ten minutes
LOOKUP_BUDGET_S = 2.0  # leave room in Slack's 3 s for the answer itself


class Agents:
    def __init__(self, client: AsyncWebClient, team_id: str, admins: list[str], ttl_s: float = CACHE_TTL_S):
        self.client = client
        self.team_id = team_id  # the bot's own workspace (auth.test)
        self.admins = set(admins)
        self.ttl_s = ttl_s
        self._known: dict[str, tuple[bool, float]] = {}  # user id -> (agent?, when to look again)

    async def is_agent(self, user_id: str) -> bool:
        """Whether ``user_id`` is an agent; a lookup that fails says no (and is not cached)."""
        if user_id in self.admins:
            return True
        known = self._known.get(user_id)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        try:
            response = await asyncio.wait_for(self.client.users_info(user=user_id), LOOKUP_BUDGET_S)
        except (SlackApiError, TimeoutError, OSError) as exc:
            detail = exc.response.get("error") if isinstance(exc, SlackApiError) else type(exc).__name__
            log.warning("users.info for %s failed (%s): not treated as an agent", user_id, detail)
            return False
        agent = self._member(response.get("user") or {})
        self._known[user_id] = (agent, time.monotonic() + self.ttl_s)
        return agent

    def _member(self, user: dict[str, Any]) -> bool:
        """A full member of the bot's workspace: its team, no guest, no bot, not deactivated."""
        return (
            user.get("team_id") == self.team_id
            and not user.get("is_restricted")
            and not user.get("is_ultra_restricted")
            and not user.get("is_bot")
            and not user.get("deleted")
        )

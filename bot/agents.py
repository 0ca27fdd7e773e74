"""Who counts as an agent (the support team) and who as a customer.

Agents may see the bot's internals (``/triage status``, ``models``) and change labels; by default only
customers' messages are triaged. ``TRIAGE_AGENTS`` names agents explicitly: user ids, and user groups
(``S…``) whose members ``usergroups.users.list`` gives, looked up again every ``ttl_s``. Unset, an agent
is a member of the bot's own workspace who is not a guest: ``users.info`` names the person's home team
(someone from another organization in a shared channel has theirs) and marks guests ``is_restricted`` /
``is_ultra_restricted``. Triage admins always are. Lookups are cached, so a listener answers within
Slack's three seconds.

The same look-up says who may see the machinery under their own message (``sees_machinery``): a guest is
a customer who must not, whatever ``TRIAGE_AGENTS`` says (``bot/delivery.py``). Someone of another team
reads only channels shared with it, which delivery already keeps triage out of.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

log = logging.getLogger(__name__)

CACHE_TTL_S = 600.0  # a guest promoted to member (or a member demoted) is seen within ten minutes
LOOKUP_BUDGET_S = 2.0  # leave room in Slack's 3 s for the answer itself
GROUP_RETRY_S = 30.0  # a user group (or user) whose lookup failed is asked again after this


@dataclass(frozen=True)
class Person:
    """What ``users.info`` says about someone that matters here."""

    member: bool  # a full member of the bot's workspace (not a guest, bot or deactivated): an agent
    guest: bool  # a customer invited as a guest: must not see the machinery
    name: str | None = None  # as cards show them: display name, real name or handle
    team_id: str | None = None  # their home workspace (another organization's, in a shared channel)


UNKNOWN = Person(member=False, guest=True)  # a look-up that failed: the safe answer for both, no name


class Agents:
    def __init__(
        self,
        client: AsyncWebClient,
        team_id: str,
        admins: list[str],
        ttl_s: float = CACHE_TTL_S,
        configured: list[str] | None = None,
    ):
        self.client = client
        self.team_id = team_id  # the bot's own workspace (auth.test)
        self.admins = set(admins)
        self.ttl_s = ttl_s
        self._known: dict[str, tuple[Person, float]] = {}  # user id -> (what they are, when to look again)
        self._failing: set[str] = set()  # users whose look-up failed (logged once, until it works again)
        # TRIAGE_AGENTS: None (unset) means the workspace rule above
        self.configured = configured or None
        self._users = {i for i in configured or () if not i.startswith("S")}
        self._groups: dict[str, tuple[frozenset[str], float]] = {  # group id -> (members, when to look again)
            i: (frozenset(), 0.0) for i in configured or () if i.startswith("S")
        }
        self._refreshing = asyncio.Lock()  # one round of group lookups at a time, however many ask

    async def is_agent(self, user_id: str) -> bool:
        """Whether ``user_id`` is an agent; a lookup that fails says no."""
        if user_id in self.admins:
            return True
        if self.configured is not None:
            return user_id in self._users or user_id in await self.group_members()
        return (await self.person(user_id)).member

    async def sees_machinery(self, user_id: str) -> bool:
        """Whether ``user_id`` may see triage labels under their own message: not a guest (``users.info``);
        a lookup that fails says no."""
        return not (await self.person(user_id)).guest

    async def person(self, user_id: str) -> Person:
        """``users.info`` about ``user_id``, cached; a lookup that fails gives ``UNKNOWN``, is logged once
        (not at every message) and is tried again after ``GROUP_RETRY_S``."""
        known = self._known.get(user_id)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        try:
            response = await asyncio.wait_for(self.client.users_info(user=user_id), LOOKUP_BUDGET_S)
        except (SlackApiError, TimeoutError, OSError) as exc:
            detail = exc.response.get("error") if isinstance(exc, SlackApiError) else type(exc).__name__
            if user_id not in self._failing:
                self._failing.add(user_id)
                log.warning(
                    "users.info for %s failed (%s): not treated as an agent, and shown no labels",
                    user_id,
                    detail,
                )
            self._known[user_id] = (UNKNOWN, time.monotonic() + min(self.ttl_s, GROUP_RETRY_S))
            return UNKNOWN
        self._failing.discard(user_id)
        found = self._person(response.get("user") or {})
        self._known[user_id] = (found, time.monotonic() + self.ttl_s)
        return found

    async def group_members(self) -> frozenset[str]:
        """Everyone in the configured user groups; a group whose lookup fails keeps its last known members."""
        async with self._refreshing:
            now = time.monotonic()
            stale = [g for g, (_, due) in self._groups.items() if due <= now]
            found = await asyncio.gather(*(self._lookup_group(g) for g in stale))
            for group, members in zip(stale, found, strict=True):
                if members is None:  # try again soon, not at every message
                    self._groups[group] = (self._groups[group][0], now + min(self.ttl_s, GROUP_RETRY_S))
                else:
                    self._groups[group] = (members, now + self.ttl_s)
        return frozenset().union(*(members for members, _ in self._groups.values()))

    async def _lookup_group(self, group_id: str) -> frozenset[str] | None:
        try:
            response = await asyncio.wait_for(
                self.client.usergroups_users_list(usergroup=group_id), LOOKUP_BUDGET_S
            )
        except (SlackApiError, TimeoutError, OSError) as exc:
            detail = exc.response.get("error") if isinstance(exc, SlackApiError) else type(exc).__name__
            log.warning("usergroups.users.list for %s failed (%s): members stay as known", group_id, detail)
            return None
        users = response.get("users")
        return frozenset(u for u in users if isinstance(u, str)) if isinstance(users, list) else frozenset()

    def _person(self, user: dict[str, Any]) -> Person:
        guest = bool(user.get("is_restricted") or user.get("is_ultra_restricted"))
        # a full member of the bot's workspace: its team, no guest, no bot, not deactivated
        member = (
            user.get("team_id") == self.team_id
            and not guest
            and not user.get("is_bot")
            and not user.get("deleted")
        )
        profile = user.get("profile") or {}
        name = profile.get("display_name") or profile.get("real_name") or user.get("name")
        team_id = user.get("team_id")
        return Person(
            member=member,
            guest=guest,
            name=str(name) if name else None,
            team_id=str(team_id) if team_id else None,
        )

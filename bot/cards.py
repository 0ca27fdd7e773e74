"""Triage cards: one message per triaged customer message in the internal ``TRIAGE_CARD_CHANNEL``.

A card shows who asked (and, for someone from another organization, which one), where, the message
quoted with its permalink, each head's label, and why the model chose the topic (the training messages
most like it, also in the Fix labels modal; never in a customer's channel); its buttons fix labels (a
modal), claim it, call it not a request, and escalate or de-escalate it. It is rewritten
(``chat.update``) whenever any of that changes.

Cards wait in the database (``cards.due_at``) until posted: Slack takes about one post per second per
channel, so a burst queues there, never in memory and never dropped, and urgent cards go first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from slack_sdk.errors import SlackApiError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import blocks
from bot.agents import UNKNOWN, Agents
from bot.blocks import LabelView
from bot.retrain import FEEDBACK_SOURCE, feedback_message_id
from bot.settings import BotSettings
from bot.slack_output import SlackOutput, is_permanent
from bot.storage import repository as repo
from bot.storage.database import in_transaction
from bot.storage.models import Card, EscalationState, Incident, Message, utcnow
from classifier.results import Neighbor

if TYPE_CHECKING:
    from slack_bolt.async_app import AsyncApp

    from bot.agents import Agents
    from bot.triage import Outcome, Triage

log = logging.getLogger(__name__)
Ack = Callable[..., Awaitable[None]]

FIX_ACTION = "card_fix"  # opens the Fix labels modal
CLAIM_ACTION = "card_claim"
NOT_REQUEST_ACTION = "card_not_request"
ESCALATE_ACTION = "card_escalate"
DEESCALATE_ACTION = "card_deescalate"
ACKNOWLEDGE_ACTION = "escalation_ack"  # on the escalation post
ESCALATION_CLAIM_ACTION = "escalation_claim"  # on the escalation post
FIX_LABELS_CALLBACK = "card_fix_labels"  # the modal's callback_id; private_metadata: the message id
SELECT_ACTION_PREFIX = "label:"  # one static_select per head in the modal: "label:<head>"
QUOTE_CHARS = 300
WHY_COUNT = 3  # training messages asked for with each prediction, shown on its card and modal
WHY_CHARS = 120  # each one's snippet
RETRY_BASE_S = 2.0  # a card Slack did not take is tried again after this, doubling ...
RETRY_MAX_S = 60.0  # ... up to this (a card channel the bot is not in yet: until it is invited)
# Slack's message metadata on every card: how a later attempt recognises a card already posted
CARD_EVENT_TYPE = "triage_card"
ADOPT_MARGIN_S = 300.0  # a card is looked for from this long before it was queued (clocks differ)


@dataclass(frozen=True)
class Requester:
    user_id: str | None
    name: str
    organization: str | None = None  # another organization's name (Slack Connect); None: ours


TEAM_RETRY_S = 60.0  # a team.info look-up that failed is tried again after this long


class People:
    """Who wrote a message, for the card: the person as ``Agents`` looked them up (one cached ``users.info``
    for both) and, for another organization, ``team.info``; a failed look-up shows the bare mention
    instead of failing the card."""

    def __init__(self, agents: Agents):
        self.agents = agents
        self.client = agents.client
        self._teams: dict[str, str] = {}
        self._unnamed: dict[str, float] = {}  # team id -> when to ask team.info again after a failure

    async def requester(self, user_id: str | None, own_team: str) -> Requester:
        if not user_id:
            return Requester(None, "someone")
        person = await self.agents.person(user_id)
        mention = f"<@{user_id}>"  # Slack shows the person's name in its place
        if person is UNKNOWN:  # the look-up failed (Agents logged it)
            return Requester(user_id, mention)
        team = person.team_id or own_team
        organization = await self._organization(team) if team != own_team else None
        return Requester(user_id, person.name or mention, organization)

    async def _organization(self, team_id: str) -> str:
        if team_id in self._teams:
            return self._teams[team_id]
        if self._unnamed.get(team_id, 0.0) > time.monotonic():
            return team_id  # failed a moment ago: one look-up (and one warning) per team a minute
        try:
            team = (await self.client.team_info(team=team_id)).get("team") or {}
        except (SlackApiError, OSError, TimeoutError) as exc:
            log.warning("team.info for %s failed (%s): cards show the team id for a minute", team_id, exc)
            self._unnamed[team_id] = time.monotonic() + TEAM_RETRY_S
            return team_id
        self._teams[team_id] = str(team.get("name") or team_id)
        return self._teams[team_id]


@dataclass(frozen=True)
class CardContent:
    message: Message
    card: Card
    views: Mapping[str, LabelView]
    labels: Mapping[str, Sequence[str]]
    model_version: str
    requester: Requester
    permalink: str | None
    why: Sequence[Neighbor] = ()  # the training messages most like it, most similar first


def quote(message: Message) -> str:
    """The message's first ~300 characters, quoted; what became of it once its text is gone."""
    if message.deleted_at is not None:
        return "_(deleted by its author)_"
    text = message.text
    if text is None:
        return "_(text removed)_"
    return blocks.quoted(text, QUOTE_CHARS)


def why_references(neighbors: Sequence[Neighbor] | None) -> list[dict[str, Any]] | None:
    """Why this label as a prediction stores it (``Prediction.neighbors``): a Slack message by its id, so
    its text is read when shown and is gone once the message's text is (forgotten, purged, deleted); a
    row of the operator's dataset by its text."""
    if neighbors is None:
        return None
    stored: list[dict[str, Any]] = []
    for near in neighbors:
        item: dict[str, Any] = {"label": near.label, "similarity": round(near.similarity, 4)}
        message_id = feedback_message_id(near.source) if near.source.startswith(FEEDBACK_SOURCE) else None
        if message_id is None:
            item["text"] = near.text
        else:
            item["message_id"] = message_id
        stored.append(item)
    return stored


async def stored_why(session: AsyncSession, stored: Sequence[Any] | None) -> list[Neighbor]:
    """A prediction's stored neighbours with their texts; a Slack message whose text is gone is left
    out. A Slack message's text keeps Slack's escaping (``source`` says so), a dataset row's is raw."""
    items = [item for item in stored or () if isinstance(item, dict)]
    ids = {item["message_id"] for item in items if isinstance(item.get("message_id"), int)}
    texts = await repo.message_texts(session, ids) if ids else {}
    why = []
    for item in items[:WHY_COUNT]:
        message_id = item.get("message_id")
        text = texts.get(message_id) if isinstance(message_id, int) else item.get("text")
        if isinstance(text, str) and isinstance(item.get("similarity"), int | float):
            source = f"{FEEDBACK_SOURCE}{message_id}" if isinstance(message_id, int) else ""
            why.append(Neighbor(text, str(item.get("label", "")), float(item["similarity"]), source))
    return why


def _escaped(text: str) -> str:
    """Plain text made safe for mrkdwn (Slack's three control characters)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _snippet(near: Neighbor) -> str:
    """One line of the text, cut to ``WHY_CHARS``; a Slack message's text is already escaped."""
    text = " ".join(near.text.split())
    text = blocks.defused(text) if near.source.startswith(FEEDBACK_SOURCE) else _escaped(text)
    return blocks.cut(text, WHY_CHARS)  # never half an entity, mention or link


def why_block(why: Sequence[Neighbor]) -> dict[str, Any] | None:
    """A context block: the label the model chose and the training messages most like this one (up to
    ``WHY_COUNT``), each quoted with its cosine similarity; None when there are none."""
    if not why:
        return None
    title = f":mag: Why _{_escaped(why[0].label)}_: the most similar training messages"
    shown = [f"{near.similarity:.2f} “{_snippet(near)}”" for near in why[:WHY_COUNT]]
    return {
        "type": "context",
        "block_id": "why",
        "elements": [{"type": "mrkdwn", "text": text} for text in (title, *shown)],
    }


def _plain(text: str) -> dict[str, Any]:
    return {"type": "plain_text", "text": text}


def _button(action_id: str, text: str, value: str, style: str | None = None) -> dict[str, Any]:
    button: dict[str, Any] = {
        "type": "button",
        "action_id": action_id,
        "value": value,
        "text": _plain(text),
    }
    if style:
        button["style"] = style
    return button


button = _button  # also the review queue's (bot/review.py)


def status_line(card: Card, unsure_urgent: bool) -> str:
    """Claim, escalation state, and the unsure-urgent flag, as one line."""
    parts = []
    if card.claimed_by:
        parts.append(f":raising_hand: claimed by <@{card.claimed_by}>")
    if card.not_request_by:
        parts.append(f":zzz: not a request (<@{card.not_request_by}>)")
    if card.escalation_state == EscalationState.ESCALATED:
        by = f" by <@{card.escalated_by}>" if card.escalated_by else ""
        parts.append(f":rotating_light: escalated{by}")
    elif card.escalation_state == EscalationState.ACKNOWLEDGED:
        parts.append(f":rotating_light: escalated, acknowledged by <@{card.acknowledged_by}>")
    elif card.escalation_state == EscalationState.DEESCALATED:
        parts.append(f":arrow_down: de-escalated by <@{card.deescalated_by}>")
    elif unsure_urgent:
        parts.append(":eyes: possibly urgent (the model is unsure): take a look")
    return " · ".join(parts) or "unclaimed"


def card_blocks(content: CardContent, settings: BotSettings) -> list[dict[str, Any]]:
    message, card, requester = content.message, content.card, content.requester
    who = f"*{requester.name}*" + (f" ({requester.organization})" if requester.organization else "")
    link = f" · <{content.permalink}|open>" if content.permalink else ""
    value = str(message.id)
    escalated = card.escalation_state in (EscalationState.ESCALATED, EscalationState.ACKNOWLEDGED)
    buttons = [
        _button(FIX_ACTION, "Fix labels", value),
        _button(CLAIM_ACTION, "Claim", value),
        _button(NOT_REQUEST_ACTION, "Not a request", value),
        _button(DEESCALATE_ACTION, "De-escalate", value)
        if escalated
        else _button(ESCALATE_ACTION, "Escalate", value, "danger"),
    ]
    unsure_below = settings.triage_unsure_below
    status = status_line(card, unsure_urgent(content.views, settings))
    why = why_block(content.why)
    return [
        {
            "type": "section",
            "block_id": "who",
            "text": {"type": "mrkdwn", "text": f"{who} in <#{message.channel_id}>{link}"},
        },
        {"type": "section", "block_id": "quote", "text": {"type": "mrkdwn", "text": quote(message)}},
        {
            "type": "section",
            "block_id": "labels",
            "text": {"type": "mrkdwn", "text": blocks.label_lines(content.views, unsure_below)},
        },
        *([why] if why else []),
        {
            "type": "context",
            "block_id": "status",
            "elements": [{"type": "mrkdwn", "text": status}],
        },
        {"type": "actions", "block_id": f"card:{value}", "elements": buttons},
    ]


def escalation_summary(content: CardContent) -> str:
    """The escalation post's headline, also its notification text: level, where, labels and the link;
    once de-escalated it says so first (and drops the link)."""
    message = content.message
    headline = blocks.escalation_text(
        content.views, blocks.permalink_or_note(content.permalink), message.channel_id
    )
    if content.card.escalation_state == EscalationState.DEESCALATED:
        first = headline.split("\n", 1)[0].removeprefix(":rotating_light: ")
        return f":arrow_down: *de-escalated* · {first}"
    return headline


def escalation_blocks(content: CardContent, settings: BotSettings) -> list[dict[str, Any]]:
    """The post in the escalation channel: what, where, who asked; Acknowledge and Claim while it stands."""
    message, card = content.message, content.card
    headline = escalation_summary(content)
    requester = content.requester
    who = f"from *{requester.name}*" + (f" ({requester.organization})" if requester.organization else "")
    value = str(message.id)
    shown: list[dict[str, Any]] = [
        {
            "type": "section",
            "block_id": "escalation",
            "text": {"type": "mrkdwn", "text": f"{headline}\n{who}"},
        },
        {"type": "section", "block_id": "quote", "text": {"type": "mrkdwn", "text": quote(message)}},
        {
            "type": "context",
            "block_id": "status",
            "elements": [{"type": "mrkdwn", "text": status_line(card, unsure_urgent=False)}],
        },
    ]
    if card.escalation_state != EscalationState.DEESCALATED:
        buttons = [_button(ESCALATION_CLAIM_ACTION, "Claim", value)]
        if card.escalation_state == EscalationState.ESCALATED:
            buttons.insert(0, _button(ACKNOWLEDGE_ACTION, "Acknowledge", value, "primary"))
        shown.append({"type": "actions", "block_id": f"escalation:{value}", "elements": buttons})
    return shown


def standing(card: Card) -> bool:
    """Whether the card's escalation still stands (escalated, maybe acknowledged; not de-escalated)."""
    return card.escalation_state in (EscalationState.ESCALATED, EscalationState.ACKNOWLEDGED)


def is_urgent(views: Mapping[str, LabelView], settings: BotSettings) -> bool:
    urgency = views.get(settings.triage_urgency_head)
    return urgency is not None and urgency.label in settings.triage_urgent_labels


def unsure_urgent(views: Mapping[str, LabelView], settings: BotSettings) -> bool:
    """An urgent label the model is unsure of (nobody set it): flagged for a look, not escalated."""
    urgency = views.get(settings.triage_urgency_head)
    return (
        is_urgent(views, settings)
        and urgency is not None
        and urgency.by is None
        and urgency.confidence is not None
        and urgency.confidence < settings.triage_unsure_below
    )


def fix_labels_view(content: CardContent) -> dict[str, Any]:
    """The Fix labels modal: one select per head, the current label preselected, and why this label."""
    inputs = []
    for head, view in list(content.views.items())[:20]:
        options = [
            {"text": _plain(label[:75]), "value": label[:150]}
            for label in list(content.labels.get(head, [view.label]))[: blocks.MAX_OPTIONS]
        ]
        initial = next((o for o in options if o["value"] == view.label), None)
        select: dict[str, Any] = {
            "type": "static_select",
            "action_id": f"{SELECT_ACTION_PREFIX}{head}",
            "options": options,
        }
        if initial is not None:
            select["initial_option"] = initial
        inputs.append(
            {
                "type": "input",
                "block_id": f"head:{head}",
                "label": _plain(blocks.head_title(head)),
                "element": select,
            }
        )
    return {
        "type": "modal",
        "callback_id": FIX_LABELS_CALLBACK,
        "private_metadata": str(content.message.id),
        "title": _plain("Fix labels"),
        "submit": _plain("Save"),
        "close": _plain("Cancel"),
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": quote(content.message)}},
            *([why] if (why := why_block(content.why)) else []),
            *inputs,
        ],
    }


def submitted_labels(view: Mapping[str, Any]) -> dict[str, str]:
    """head → label from a Fix labels ``view_submission`` (``view.state.values``)."""
    chosen: dict[str, str] = {}
    values = (view.get("state") or {}).get("values") or {}
    for block in values.values() if isinstance(values, dict) else ():
        for action_id, state in (block or {}).items():
            option = (state or {}).get("selected_option") or {}
            if str(action_id).startswith(SELECT_ACTION_PREFIX) and isinstance(option.get("value"), str):
                chosen[str(action_id)[len(SELECT_ACTION_PREFIX) :]] = option["value"]
    return chosen


class CardDesk:
    """Posts queued cards (urgent first, paced by ``SlackOutput``) and keeps posted ones current."""

    def __init__(
        self,
        settings: BotSettings,
        sessions: async_sessionmaker[AsyncSession],
        output: SlackOutput,
        bot_user_id: str | None = None,
        agents: Agents | None = None,
    ):
        self.settings = settings
        self.sessions = sessions
        self.output = output
        self.bot_user_id = bot_user_id  # an adopted card must be our own post
        # without the bot's Agents (tests), a look-up of its own: only names are read from it
        self.people = People(agents or Agents(output.client, team_id="", admins=[]))
        self.wake = asyncio.Event()
        self._permalinks: dict[int, str] = {}

    @property
    def channel(self) -> str | None:
        return self.settings.triage_card_channel

    # ---- the queue ----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Post due cards one at a time until ``stop``; woken by new cards, else looks every interval."""
        while not stop.is_set():
            self.wake.clear()  # before looking: a card queued from now on wakes the wait below
            try:
                posted = await self.post_next()
            except Exception:  # a database hiccup must not end the loop; the card stays queued
                log.exception("posting a card failed")
                posted = False
            if not posted:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        _first(stop.wait(), self.wake.wait()), self.settings.triage_pending_interval_s
                    )

    async def post_next(self) -> bool:
        """Post the next due card; whether there was one.

        At most one card per message, wherever a replica dies: the card is leased (``claim_due_card``)
        before it is posted, and posted with metadata naming its message; a later attempt on a card an
        earlier one took first looks for that post in the card channel and adopts it (as thread replies
        are adopted: ``SlackOutput.find_own_post``)."""
        if self.channel is None:
            return False
        async with self.sessions.begin() as session:
            card = await repo.claim_due_card(session)
        if card is None:
            return False
        if card.attempts > 1 and await self._adopted(card, self.channel):
            return True
        content = await self.content(card.message_id)
        if content is None:  # the message went away meanwhile (the row cascades)
            return True
        text, card_view = self.render(content)
        try:
            posted = await self.output.post_or_raise(
                self.channel,
                text,
                blocks=card_view,
                metadata={"event_type": CARD_EVENT_TYPE, "event_payload": {"message_id": card.message_id}},
            )
        except SlackApiError as exc:
            await self._retry(card, "chat.postMessage", exc)
            return True
        await self._record(card, str(posted["channel"]), str(posted["ts"]))
        return True

    async def _adopted(self, card: Card, channel: str) -> bool:
        """Whether this attempt is over before posting: the card an earlier attempt posted (and died before
        recording) was found and adopted, or the channel could not be read (tried again later)."""
        oldest = card.created_at.timestamp() - ADOPT_MARGIN_S
        try:
            found = await self.output.find_own_post(
                event_type=CARD_EVENT_TYPE,
                message_id=card.message_id,
                bot_user_id=self.bot_user_id,
                channel=channel,
                oldest=f"{oldest:.6f}",
            )
        except SlackApiError as exc:
            await self._retry(card, "conversations.history", exc)
            return True
        if found is None:
            return False
        log.info("message %s: adopted the card an earlier attempt posted", card.message_id)
        await self._record(card, channel, found)
        await self.refresh(card.message_id)  # it shows what changed since it was posted
        return True

    async def _record(self, card: Card, channel: str, ts: str) -> None:
        await in_transaction(self.sessions, lambda s: repo.card_posted(s, card.id, channel_id=channel, ts=ts))

    async def _retry(self, card: Card, method: str, exc: SlackApiError) -> None:
        """Slack refused: the card waits in the database, a while longer each time."""
        delay = (
            RETRY_MAX_S if is_permanent(exc) else min(RETRY_BASE_S * 2 ** (card.attempts - 1), RETRY_MAX_S)
        )
        log.warning(
            "card for message %s not posted (%s: %s): trying again in %.0f s",
            card.message_id,
            method,
            exc.response.get("error"),
            delay,
        )
        async with self.sessions.begin() as session:
            await repo.retry_card(session, card.id, at=utcnow() + timedelta(seconds=delay))

    # ---- what a card shows --------------------------------------------------------------------------
    async def content(self, message_id: int) -> CardContent | None:
        async with self.sessions() as session:
            message = await session.get(Message, message_id)
            # a message without a card row (thread or silent mode, not escalated) shows as a fresh one
            card = await repo.get_card(session, message_id) or Card(message_id=message_id)
            prediction = await repo.latest_prediction(session, message_id)
            if message is None or prediction is None:
                return None
            human = await repo.standing_corrections(session, message_id)
            views, labels = blocks.current_views(prediction.by_head(), human, message.edited_at)
            model_version = prediction.model_version
            why = await stored_why(session, prediction.neighbors)
        requester = await self.people.requester(message.user_id, message.team_id)
        permalink = await self._permalink(message)
        return CardContent(message, card, views, labels, model_version, requester, permalink, why)

    def render(self, content: CardContent) -> tuple[str, list[dict[str, Any]]]:
        where = f"{content.requester.name} in <#{content.message.channel_id}>"
        text = f"{where}: {blocks.summary_text(content.views)}"
        return text, card_blocks(content, self.settings)

    async def _permalink(self, message: Message) -> str | None:
        if message.id not in self._permalinks:
            link = await self.output.permalink(message.channel_id, message.ts)
            if link is None:
                return None
            if len(self._permalinks) > 10_000:  # a bounded cache: links never change, but memory is finite
                self._permalinks.clear()
            self._permalinks[message.id] = link
        return self._permalinks[message.id]

    async def refresh(self, message_id: int) -> None:
        """Rewrite the posted card and escalation post to show the current state (a queued card is
        rendered when it is posted)."""
        content = await self.content(message_id)
        if content is None:
            return
        card = content.card
        if card.ts and card.channel_id:
            text, card_view = self.render(content)
            await self.output.update(card.channel_id, card.ts, text, blocks=card_view)
        if card.escalation_ts and card.escalation_channel_id:
            await self.output.update(
                card.escalation_channel_id,
                card.escalation_ts,
                escalation_summary(content),
                blocks=escalation_blocks(content, self.settings),
            )

    # ---- escalation ---------------------------------------------------------------------------------
    async def follow_labels(self, message_id: int) -> bool:
        """Escalation follows the current labels: a person raising urgency to an urgent label escalates;
        urgency no longer urgent de-escalates. Returns whether the state changed."""
        content = await self.content(message_id)
        if content is None:
            return False
        urgency = content.views.get(self.settings.triage_urgency_head)
        by = urgency.by if urgency else None
        urgent = is_urgent(content.views, self.settings)
        if urgent and not standing(content.card) and by is not None:
            return await self.escalate(message_id, by)
        changed = not urgent and standing(content.card) and await self.deescalate(message_id, by)
        if not urgent and by is not None:  # a person lowered the thread: the replies' alarms go too
            changed |= await self._deescalate_replies(content.message, by)
        return changed

    async def _deescalate_replies(self, message: Message, by: str) -> bool:
        """De-escalate the thread replies of ``message`` that raised an escalation of their own (a
        customer's reply raising the thread's urgency), and edit their escalation posts."""
        if message.thread_ts not in (None, message.ts):
            return False  # a reply itself: its thread's first message speaks for the thread
        async with self.sessions() as session:
            thread = await repo.thread_messages(session, message.team_id, message.channel_id, message.ts)
            cards = [await repo.get_card(session, m.id) for m in thread if m.id != message.id]
        raised = [card.message_id for card in cards if card is not None and standing(card)]
        for reply_id in raised:
            if await self.deescalate(reply_id, by):
                await self.refresh(reply_id)
        return bool(raised)

    async def escalate(self, message_id: int, by: str | None) -> bool:
        """Mark the message escalated and announce it in the escalation channel (a fresh post, also after
        an earlier de-escalation: a new alarm should notify). ``by``: None when the model's labels did."""
        async with self.sessions.begin() as session:
            card = await repo.ensure_card(session, message_id)
            if standing(card):
                return False
            card.escalation_state = EscalationState.ESCALATED
            card.escalated_by, card.acknowledged_by, card.deescalated_by = by, None, None
            card.escalation_channel_id = card.escalation_ts = None
        channel = self.settings.triage_escalation_channel
        content = await self.content(message_id)
        if content is None:
            return True
        thread_ts = await self._incident_thread(content)
        if channel is None:
            return True
        posted = await self.output.post(
            channel,
            escalation_summary(content),
            blocks=escalation_blocks(content, self.settings),
            thread_ts=thread_ts,
        )
        if posted is not None:
            await in_transaction(
                self.sessions,
                lambda s: repo.set_escalation_post(s, message_id, str(posted["channel"]), str(posted["ts"])),
            )
        return True

    async def _incident_thread(self, content: CardContent) -> str | None:
        """Record the escalation's topic; the thread of its topic's incident to post it in, if one is going
        or this escalation starts one (TRIAGE_INCIDENT_COUNT of a topic within TRIAGE_INCIDENT_MINUTES)."""
        topic_view = content.views.get("topic")
        topic = topic_view.label[:128] if topic_view else None
        try:
            incident, started = await self._join_or_start_incident(content.message.id, topic)
        except IntegrityError:  # another replica started the topic's incident a moment ago: join theirs
            incident, started = await self._join_or_start_incident(content.message.id, topic)
        if incident is None or not started:
            return incident.ts if incident else None
        count, incident_id, about = incident.escalations, incident.id, incident.topic
        channel = self.settings.triage_escalation_channel
        if channel is None:
            return None
        minutes = self.settings.triage_incident_minutes
        posted = await self.output.post(
            channel,
            f":rotating_light: *Possible incident*: {count} urgent messages about *{about}* in the last "
            f"{minutes:g} minutes. Later ones follow in this thread.",
        )
        if posted is None:
            return None
        ts = str(posted["ts"])
        await in_transaction(
            self.sessions, lambda s: repo.set_incident_post(s, incident_id, str(posted["channel"]), ts)
        )
        return ts

    async def _join_or_start_incident(
        self, message_id: int, topic: str | None
    ) -> tuple[Incident | None, bool]:
        """Count this escalation under its topic's open incident, or start one if it completes a burst;
        ``(incident, whether this escalation started it)``. Replicas agree through the database: one open
        incident per topic (``incidents.open_topic`` is unique)."""
        now = utcnow()
        since = now - timedelta(minutes=self.settings.triage_incident_minutes)
        async with self.sessions.begin() as session:
            # a write first: on SQLite it takes the write lock, so replicas decide one after another
            await repo.mark_escalated(session, message_id, topic=topic, at=now)
            if topic is None:
                return None, False
            incident = await repo.open_incident(session, topic, since=since)
            if incident is not None:
                await repo.join_incident(session, incident.id, at=now)
                return incident, False
            count = await repo.count_escalations(session, topic, since=since)
            if count < self.settings.triage_incident_count:
                return None, False
            return await repo.start_incident(session, topic, at=now, since=since, escalations=count), True

    async def deescalate(self, message_id: int, by: str | None) -> bool:
        return await self._change(
            message_id,
            when=(EscalationState.ESCALATED, EscalationState.ACKNOWLEDGED),
            escalation_state=EscalationState.DEESCALATED,
            deescalated_by=by,
        )

    async def acknowledge(self, message_id: int, by: str) -> bool:
        return await self._change(
            message_id,
            when=(EscalationState.ESCALATED,),
            escalation_state=EscalationState.ACKNOWLEDGED,
            acknowledged_by=by,
        )

    # ---- what agents do on a card -------------------------------------------------------------------
    async def claim(self, message_id: int, user_id: str) -> bool:
        return await self._change(message_id, claimed_by=user_id, claimed_at=utcnow())

    async def _change(
        self, message_id: int, when: tuple[EscalationState, ...] | None = None, **values: Any
    ) -> bool:
        """Set ``values`` on the message's card (only in an escalation state of ``when``, if given)."""
        async with self.sessions.begin() as session:
            card = await repo.get_card(session, message_id)
            if card is None or (when is not None and card.escalation_state not in when):
                return False
            for key, value in values.items():
                setattr(card, key, value)
        return True


async def _first(*waits: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


# ---- Slack's side: the buttons and the modal ------------------------------------------------------------
Later = Callable[[Awaitable[Any], str], None]


def register(app: AsyncApp, triage: Triage, agents: Agents, later: Later) -> None:
    """The card's buttons and the Fix labels modal. Only agents change anything; others are told so."""
    desk = triage.cards
    output = triage.output

    async def agent_or_told(body: dict[str, Any]) -> str | None:
        """The clicking user's id when they are an agent; otherwise an ephemeral says why nothing happens."""
        user_id = str((body.get("user") or {}).get("id") or "")
        if user_id and await agents.is_agent(user_id):
            return user_id
        channel = str((body.get("channel") or {}).get("id") or "")
        if user_id and channel:
            later(output.ephemeral(channel, user_id, "Only agents can change triage."), "refusal note")
        return None

    def message_id_of(action: dict[str, Any]) -> int | None:
        try:
            return int(str(action.get("value")))
        except ValueError:
            return None

    def told(outcome: Outcome, user_id: str) -> None:
        """Show an agent's correction: the card (and reply) rewritten, or a note that says why not."""
        if outcome.note and outcome.note_in:
            later(output.ephemeral(outcome.note_in, user_id, outcome.note), "correction note")
        if outcome.refresh is not None:
            later(triage.refresh_reply(outcome.refresh), "card update after a correction")

    @app.action(FIX_ACTION)
    @app.action(blocks.FIX_ACTION)  # the thread reply's button: the same modal, no menus in the channel
    async def fix(ack: Ack, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        message_id, trigger_id = message_id_of(action), body.get("trigger_id")
        if message_id is None or not isinstance(trigger_id, str) or await agent_or_told(body) is None:
            return
        content = await desk.content(message_id)
        if content is not None:  # at once: a trigger_id opens a view only within three seconds
            await output.open_view(trigger_id, fix_labels_view(content))

    @app.view(FIX_LABELS_CALLBACK)
    async def fixed(ack: Ack, body: dict[str, Any], view: dict[str, Any]) -> None:
        await ack()  # closes the modal
        user_id = await agent_or_told(body)
        try:
            message_id = int(str(view.get("private_metadata")))
        except ValueError:
            return
        if user_id is None:
            return
        team_id = str((body.get("team") or {}).get("id") or "")
        told(await triage.on_labels_submitted(team_id, user_id, message_id, submitted_labels(view)), user_id)

    async def on_card(body: dict[str, Any], action: dict[str, Any], change: Any, what: str) -> None:
        message_id = message_id_of(action)
        user_id = await agent_or_told(body) if message_id is not None else None
        if message_id is not None and user_id is not None and await change(message_id, user_id):
            later(desk.refresh(message_id), f"card update after {what}")

    @app.action(CLAIM_ACTION)
    async def claim(ack: Ack, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        await on_card(body, action, desk.claim, "a claim")

    @app.action(NOT_REQUEST_ACTION)
    async def not_request(ack: Ack, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        message_id = message_id_of(action)
        user_id = await agent_or_told(body) if message_id is not None else None
        if message_id is not None and user_id is not None:
            team_id = str((body.get("team") or {}).get("id") or "")
            told(await triage.mark_not_a_request(team_id, user_id, message_id), user_id)

    @app.action(ESCALATE_ACTION)
    async def escalate(ack: Ack, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        await on_card(body, action, desk.escalate, "an escalation")

    @app.action(DEESCALATE_ACTION)
    async def deescalate(ack: Ack, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        await on_card(body, action, desk.deescalate, "a de-escalation")

    @app.action(ACKNOWLEDGE_ACTION)
    async def acknowledge(ack: Ack, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        await on_card(body, action, desk.acknowledge, "an acknowledgement")

    @app.action(ESCALATION_CLAIM_ACTION)
    async def escalation_claim(ack: Ack, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        await on_card(body, action, desk.claim, "a claim")

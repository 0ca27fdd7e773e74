"""The life of a message after it was first triaged: edits, deletions, replies in its thread, and the
Workflow Builder posts that are triaged like a person's message.

``MessageLife.handle`` takes the ``message`` events that are not a person's new top-level message (the
app hands those to ``Triage.on_message``) and returns whether it dealt with the event:

* **edited** (``message_changed`` with another text): the stored text is replaced and the message
  classified again; the reply is rewritten with the new prediction, and labels people gave the earlier
  text stay, marked "before the edit" (not trained on: ``repository.export_training_set``). An edit that
  keeps the text (an unfurl, a reply count) changes nothing.
* **deleted** (``message_deleted``, or the ``tombstone`` a deleted thread parent leaves): the text is
  removed as ``triage data forget`` removes texts, the bot's reply is deleted, nothing of it is trained on.
* **a reply in a triaged thread**: stored and classified for urgency only (no reply of its own); when it
  raises the thread's urgency to an urgent label, the thread is escalated (``follow_urgency``).
* **Workflow Builder posts** (``bot_message``) and posts of bots in ``TRIAGE_ALLOWED_BOTS``: triaged.

What happened while the bot was away comes the same ways: ``bot/backfill.py`` hands the replies it reads
to ``handle`` and the edits and tombstones it finds to ``edited`` and ``deleted``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession

from bot import blocks
from bot.blocks import LabelView
from bot.reactions import URGENT_MARKER
from bot.settings import Delivery
from bot.storage import repository as repo
from bot.storage.models import Message, MessageState

if TYPE_CHECKING:
    from bot.triage import IncomingMessage, Triage

log = logging.getLogger(__name__)

# subtypes of a person writing something (in a thread, too)
WRITTEN_SUBTYPES = {None, "file_share", "thread_broadcast"}


def is_thread_reply(message: Message) -> bool:
    return message.thread_ts is not None and message.thread_ts != message.ts


class MessageLife:
    def __init__(self, triage: Triage):
        self.triage = triage
        self.settings = triage.settings

    async def handle(
        self, body: Mapping[str, Any], event: Mapping[str, Any], context: Mapping[str, Any]
    ) -> bool:
        """Deal with an edit, a deletion, a thread reply or an allowed bot's post; ``False``: not one."""
        subtype = event.get("subtype")
        team_id = str(body.get("team_id") or event.get("team") or "")
        channel = str(event.get("channel") or "")
        event_id = body.get("event_id")
        if subtype == "message_changed":
            await self._edited(team_id, channel, event, event_id)
            return True
        if subtype == "message_deleted":
            ts = event.get("deleted_ts") or (event.get("previous_message") or {}).get("ts")
            if isinstance(ts, str):
                await self.deleted(team_id, channel, ts)
            return True
        own_bot = event.get("bot_id") is not None and event.get("bot_id") == context.get("bot_id")
        if own_bot or event.get("user") == context.get("bot_user_id"):
            return False  # the app ignores our own posts
        if subtype == "bot_message" or (
            event.get("bot_id") in self.settings.triage_allowed_bots and subtype in WRITTEN_SUBTYPES
        ):
            if _top_level(event):
                await self.triage.on_message(self._incoming(team_id, channel, event, event_id))
            return True
        person = event.get("user") and not event.get("bot_id")
        if subtype in WRITTEN_SUBTYPES and person and not _top_level(event):
            await self._thread_reply(team_id, channel, str(event.get("thread_ts")), event, event_id)
            return True
        return False

    def _incoming(
        self, team_id: str, channel: str, event: Mapping[str, Any], event_id: Any
    ) -> IncomingMessage:
        from bot.triage import IncomingMessage

        return IncomingMessage(
            team_id=team_id,
            channel_id=channel,
            ts=str(event["ts"]),
            user_id=event.get("user"),
            text=_text_of(event),
            thread_ts=event.get("thread_ts"),
            event_id=event_id if isinstance(event_id, str) else None,
        )

    async def _thread_reply(
        self, team_id: str, channel: str, thread_ts: str, event: Mapping[str, Any], event_id: Any
    ) -> None:
        async with self.triage.sessions() as session:
            parent = await repo.get_message(session, team_id, channel, thread_ts)
        if parent is None or parent.deleted_at is not None or is_thread_reply(parent):
            return  # not a thread the bot triages
        await self.triage.on_message(self._incoming(team_id, channel, event, event_id))

    async def _edited(self, team_id: str, channel: str, event: Mapping[str, Any], event_id: Any) -> None:
        current, previous = event.get("message"), event.get("previous_message") or {}
        if not isinstance(current, dict) or not isinstance(current.get("ts"), str):
            return
        if current.get("subtype") == "tombstone":  # a thread parent deleted: Slack leaves a tombstone
            await self.deleted(team_id, channel, current["ts"])
            return
        if isinstance(previous, dict) and _text_of(previous) == _text_of(current):
            return  # an unfurl, a reply count, a pin: the text is the same
        await self.edited(team_id, channel, current, event_id)

    async def edited(
        self, team_id: str, channel: str, current: Mapping[str, Any], event_id: Any = None
    ) -> bool:
        """Message ``current`` (as Slack lists it now) has another text than the one stored: store it and
        classify it again. Returns whether it did (not for an unknown, deleted or unchanged message)."""
        text = repo.storable_text(_text_of(current))
        async with self.triage.sessions.begin() as session:
            if isinstance(event_id, str) and not await repo.record_event(session, event_id):
                return False
            message = await repo.get_message(session, team_id, channel, str(current["ts"]))
            if message is None or message.deleted_at is not None or message.text == text or not text.strip():
                return False
            if message.text is None:  # not kept (an agent's, a forgotten person's): nothing to classify
                return False
            waiting = message.state == MessageState.PENDING  # queued or being classified already
            message = await repo.replace_text(session, message.id, text)
        log.info("message %s in %s was edited: classified again", message.ts, message.channel_id)
        if not waiting:  # queued twice, it could be answered twice
            await self.triage.enqueue(message)
        # A message still waiting is classified once: on the new text if the sweep claims it from now on,
        # on the old one if a worker holds it already (an edit within seconds of posting).
        return True

    async def deleted(self, team_id: str, channel: str, ts: str) -> bool:
        """The message at ``ts`` was deleted; returns whether it was stored and not known deleted."""
        async with self.triage.sessions.begin() as session:
            message = await repo.get_message(session, team_id, channel, ts)
            if message is None or message.deleted_at is not None:
                return False
            message = await repo.mark_deleted(session, message.id)
        if message.reply_ts and message.reply_channel_id:
            await self.triage.output.delete(message.reply_channel_id, message.reply_ts)
        await self.triage.cards.refresh(message.id)  # the card says its message was deleted
        return True


async def reclassified(
    triage: Triage,
    message: Message,
    views: Mapping[str, LabelView],
    record: Callable[[AsyncSession], Awaitable[None]],
) -> None:
    """An edited message or a thread reply, classified: record it, show it, escalate if urgency rose."""
    before = await thread_urgency(triage, message)  # before this prediction counts
    await triage._in_transaction(record)
    if not is_thread_reply(message):
        await triage.refresh_reply(message.id)  # reply and card: the new prediction, the labels before
    urgency = views.get(triage.settings.triage_urgency_head)
    if urgency is not None and raises(triage, urgency.label, before):
        await escalate(triage, message, views)


async def thread_urgency(triage: Triage, message: Message) -> str | None:
    """The highest urgency in the message's thread so far: each message's current label (a person's, or
    else the latest prediction's)."""
    head = triage.settings.triage_urgency_head
    labels: list[str] = []
    async with triage.sessions() as session:
        thread = await repo.thread_messages(
            session, message.team_id, message.channel_id, message.thread_ts or message.ts
        )
        for m in thread:
            label = await repo.standing_label(session, m.id, head)
            if label is None:
                prediction = await repo.latest_prediction(session, m.id)
                heads = prediction.by_head() if prediction else {}
                label = heads[head].label if head in heads else None
            if label is not None:
                labels.append(label)
    return max(labels, key=lambda label: _rank(triage, label), default=None)


def raises(triage: Triage, label: str, before: str | None) -> bool:
    """Whether ``label`` is urgent and above the thread's urgency so far."""
    urgent = label in triage.settings.triage_urgent_labels
    return urgent and (before is None or _rank(triage, label) > _rank(triage, before))


def _rank(triage: Triage, label: str) -> int:
    order = blocks.ordered_labels("urgency", [*triage.settings.triage_urgent_labels, label])
    return order.index(label)


async def escalate(triage: Triage, message: Message, views: Mapping[str, LabelView]) -> None:
    """The thread became urgent: the marker on its first message (thread delivery only) and an escalation
    post about the message that raised it."""
    authors = [message.user_id]
    if is_thread_reply(message):  # the marker goes on the thread's first message: its author counts too
        async with triage.sessions() as session:
            thread_ts = message.thread_ts or message.ts
            parent = await repo.get_message(session, message.team_id, message.channel_id, thread_ts)
        authors.append(parent.user_id if parent else None)
    # never in a shared channel, nor on a thread a guest wrote in (DeliveryPolicy)
    if await triage.delivery.mode_for(message.channel_id, authors) == Delivery.THREAD:
        await triage.output.react(message.channel_id, message.thread_ts or message.ts, URGENT_MARKER)
    await triage.cards.escalate(message.id, by=None)  # the one place escalation posts are made


def _top_level(event: Mapping[str, Any]) -> bool:
    thread_ts = event.get("thread_ts")
    return not thread_ts or thread_ts == event.get("ts")


def _text_of(message: Mapping[str, Any]) -> str:
    """A message's text; a bot post without one (a Workflow Builder form) is read from its attachments."""
    text = message.get("text")
    if isinstance(text, str) and text.strip():
        return text
    parts = [
        str(a.get("text") or a.get("fallback") or "")
        for a in message.get("attachments") or []
        if isinstance(a, dict)
    ]
    return "\n".join(p for p in parts if p)

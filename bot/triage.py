"""What the bot does with Slack's events, free of Bolt: store, classify, reply, route, correct.

Every step that must not be lost is in the database first: a message is stored as pending before it is
classified, so a classifier that is down (or a crash) only delays the reply; the retry worker
(``run_pending``) picks it up, in this replica or another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import blocks, lifecycle
from bot.agents import Agents
from bot.blocks import LabelView
from bot.reactions import URGENT_MARKER, ReactionMap
from bot.settings import BotSettings
from bot.storage import repository as repo
from bot.storage.models import CorrectionKind, CorrectionSource, Message, MessageState, Prediction
from classifier.client import Classifier
from classifier.logsafe import escape_controls
from classifier.results import MAX_CHARS, ClassifierError, InvalidInput

log = logging.getLogger(__name__)

NOT_A_REQUEST = "not_a_request"  # the topic label of messages that ask for nothing (classifier/schema.py)

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


@dataclass(frozen=True)
class IncomingMessage:
    team_id: str
    channel_id: str
    ts: str
    user_id: str | None
    text: str
    thread_ts: str | None = None
    event_id: str | None = None


class Triage:
    def __init__(
        self,
        settings: BotSettings,
        sessions: async_sessionmaker[AsyncSession],
        classifier: Classifier,
        client: AsyncWebClient,
        reactions: ReactionMap,
        pacer: ChannelPacer | None = None,
        bot_user_id: str | None = None,
        agents: Agents | None = None,
    ):
        self.settings = settings
        self.agents = agents  # None: nobody is told apart (everyone's messages and labels count)
        self.bot_user_id = bot_user_id  # our own reactions are not corrections
        self.sessions = sessions
        self.classifier = classifier
        self.client = client
        self.reactions = reactions
        self.pacer = pacer or ChannelPacer()
        # bounded: under overload messages wait in the database, not in memory
        self.workers = settings.triage_workers
        self.queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=settings.triage_queue_size)
        self.backlog: repo.Backlog | None = None  # as of the last sweep: for /healthz and /metrics

    # ---- new messages ------------------------------------------------------------------------------
    async def on_message(self, incoming: IncomingMessage) -> bool:
        """Store once, before Slack gets its acknowledgement; returns whether it was queued to classify.

        Retries and racing replicas stop at the event id or the (team, channel, ts) key. A failure here
        propagates, so Slack gets an error and delivers the event again: an acknowledged message is
        always stored. Classification happens later in the bounded work queue.
        """
        text = repo.storable_text(incoming.text)
        if text != incoming.text:  # stored cleaned: a failure here would only make Slack send it again
            log.warning(
                "message %s in %s is not valid Unicode (lone surrogates or NUL): stored with U+FFFD instead",
                escape_controls(incoming.ts),
                escape_controls(incoming.channel_id),
            )
        empty = not text.strip()
        async with self.sessions.begin() as session:
            if incoming.event_id and not await repo.record_event(session, incoming.event_id):
                return False
            message, created = await repo.store_message(
                session,
                team_id=incoming.team_id,
                channel_id=incoming.channel_id,
                ts=incoming.ts,
                user_id=incoming.user_id,
                text=text,
                thread_ts=incoming.thread_ts,
                state=MessageState.SKIPPED if empty else MessageState.PENDING,
            )
        if not created or empty:
            return False
        return await self.enqueue(message)

    async def enqueue(self, message: Message) -> bool:
        """Queue a pending message the caller holds the lease of; under overload it waits in the database."""
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:  # overload: it waits in the database, due now, for the sweep to queue it
            async with self.sessions.begin() as session:
                await repo.release_message(session, message.id)
            return False
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """The background work: ``workers`` classify queued messages, one sweep feeds due pending ones."""
        workers = [asyncio.ensure_future(self._worker()) for _ in range(self.workers)]
        try:
            await self._sweep(stop)
        finally:  # messages still queued or in flight stay pending in the database: nothing is lost
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _worker(self) -> None:
        while True:
            message = await self.queue.get()
            try:
                await self.classify_and_reply(message)
            except Exception:  # stays pending: its lease expires and the sweep queues it again
                log.exception("classifying message %s failed", message.id)
            finally:
                self.queue.task_done()

    async def run_pending(self) -> int:
        """Queue pending messages that are due (classifier was down, or a worker died); returns how many."""
        room = self.queue.maxsize - self.queue.qsize()
        if room <= 0:
            return 0
        async with self.sessions.begin() as session:
            claimed = await repo.claim_due_messages(session, limit=room)
        for message in claimed:
            await self.queue.put(message)  # new messages may have taken the room meanwhile: wait for it
        return len(claimed)

    async def _sweep(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.run_pending()
                async with self.sessions() as session:
                    self.backlog = await repo.backlog(session)
            except Exception:  # a database hiccup must not end the loop
                log.exception("pending-message sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.triage_pending_interval_s)

    async def is_agent(self, user_id: str | None) -> bool:
        """Whether someone is on the support team (``bot/agents.py``): only agents change labels."""
        return bool(user_id) and (self.agents is None or await self.agents.is_agent(str(user_id)))

    async def _written_by_agent(self, message: Message) -> bool:
        return (
            self.agents is not None
            and not self.settings.triage_triage_agents
            and message.user_id is not None  # a Workflow Builder post has no author
            and await self.agents.is_agent(message.user_id)
        )

    async def classify_and_reply(self, message: Message) -> None:
        if message.text is None:  # forgotten user: stored without text, nothing to classify
            async with self.sessions.begin() as session:
                await repo.mark_skipped(session, message.id, reason="no text")
            return
        if await self._written_by_agent(message):  # kept (without its text) only so it is not taken again
            async with self.sessions.begin() as session:
                await repo.remove_text(session, message.id)
                await repo.mark_skipped(session, message.id, reason="written by an agent")
            return
        started = time.perf_counter()
        try:
            # very long messages are classified on their beginning (the model cuts at its max length
            # anyway) and stored whole
            result = await self.classifier.classify([message.text[:MAX_CHARS]])
        except InvalidInput as exc:  # retrying cannot help
            async with self.sessions.begin() as session:
                await repo.mark_skipped(session, message.id, reason=f"not classifiable: {exc}")
            return
        except (ClassifierError, OSError) as exc:  # unavailable, overloaded, unreachable: later
            await self._retry_later(message, f"classifier: {exc}")
            return
        latency_ms = (time.perf_counter() - started) * 1000
        text_result = result.results[0]
        views = {h: LabelView(label=p.label, confidence=p.confidence) for h, p in text_result.heads.items()}

        async def record(session: AsyncSession) -> None:
            await repo.add_prediction(
                session, message.id, result.model_version, text_result.heads, latency_ms=latency_ms
            )
            await repo.mark_classified(session, message.id)

        if lifecycle.is_thread_reply(message) or (message.edited_at and message.reply_ts):
            await lifecycle.reclassified(self, message, views, record)  # bot/lifecycle.py
            return
        if self.is_not_a_request(views):  # thanks, greetings: stored and classified, nothing posted
            await self._in_transaction(record)  # (card delivery: no card either)
            return
        labels = {h: list(p.scores) for h, p in text_result.heads.items()}
        reply = blocks.reply_blocks(
            message.id,
            views,
            result.model_version,
            self.reactions,
            labels,
            self.settings.triage_unsure_below,
            truncated=text_result.truncated,
        )
        text = blocks.summary_text(views)
        if message.reply_ts and message.reply_channel_id:
            # an earlier attempt replied but could not record the rest: update that reply, never post twice
            await self._call(
                "chat.update",
                self.client.chat_update,
                channel=message.reply_channel_id,
                ts=message.reply_ts,
                text=text,
                blocks=reply,
            )
        else:
            try:
                await self.pacer.wait(message.channel_id)
                posted = await self.client.chat_postMessage(
                    channel=message.channel_id,
                    thread_ts=message.ts,
                    text=text,
                    blocks=reply,
                    unfurl_links=False,
                    unfurl_media=False,
                )
            except SlackApiError as exc:
                error = f"chat.postMessage: {exc.response.get('error')}"
                if exc.response.get("error") in UNPOSTABLE:
                    log.warning("message %s in %s skipped: %s", message.ts, message.channel_id, error)
                    async with self.sessions.begin() as session:
                        await repo.mark_skipped(session, message.id, reason=error)
                else:
                    await self._retry_later(message, error)
                return
            channel, ts = str(posted["channel"]), str(posted["ts"])
            # recorded on its own and at once: whatever fails next, a retry finds the reply and updates it
            await self._in_transaction(lambda s: repo.set_reply(s, message.id, channel_id=channel, ts=ts))

        await self._in_transaction(record)
        await self._route(message, views)

    def is_not_a_request(self, views: Mapping[str, LabelView]) -> bool:
        """The model is sure the message asks for nothing ("thanks!", "hi all", "works now")."""
        topic = views.get("topic")
        return (
            topic is not None
            and topic.label == NOT_A_REQUEST
            and topic.confidence is not None
            and topic.confidence >= self.settings.triage_not_a_request_above
        )

    async def _in_transaction(
        self, work: Callable[[AsyncSession], Awaitable[Any]], attempts: int = 5
    ) -> None:
        """Bookkeeping after a reply went out: retried, since giving up would mean answering twice later."""
        for attempt in range(attempts):
            try:
                async with self.sessions.begin() as session:
                    await work(session)
                return
            except (SQLAlchemyError, TimeoutError):
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.2 * 2**attempt)

    async def _retry_later(self, message: Message, error: str) -> None:
        where = f"{escape_controls(message.ts)} in {escape_controls(message.channel_id)}"
        log.warning("message %s not answered yet: %s", where, escape_controls(error))
        async with self.sessions.begin() as session:
            await repo.schedule_retry(
                session,
                message.id,
                error=error,
                base_delay=timedelta(seconds=self.settings.triage_retry_base_s),
                max_delay=timedelta(seconds=self.settings.triage_retry_max_s),
            )

    async def _route(self, message: Message, views: Mapping[str, LabelView]) -> None:
        """Urgent messages: a reaction on the original and a post in the escalation channel; topic routes."""
        urgency = views.get(self.settings.triage_urgency_head)
        urgent = urgency is not None and urgency.label in self.settings.triage_urgent_labels
        topic = views.get("topic")
        route = self.settings.routes.get(topic.label) if topic else None
        targets = [c for c in (self.settings.triage_escalation_channel if urgent else None, route) if c]
        if urgent:
            await self._call(
                "reactions.add",
                self.client.reactions_add,
                channel=message.channel_id,
                timestamp=message.ts,
                name=URGENT_MARKER,
            )
        if not targets:
            return
        link = await self._call(
            "chat.getPermalink",
            self.client.chat_getPermalink,
            channel=message.channel_id,
            message_ts=message.ts,
        )
        permalink = str(link["permalink"]) if link else f"(message {message.ts} in <#{message.channel_id}>)"
        for channel in dict.fromkeys(targets):  # one post even if a route and escalation coincide
            await self.pacer.wait(channel)
            await self._call(
                "chat.postMessage",
                self.client.chat_postMessage,
                channel=channel,
                text=blocks.escalation_text(views, permalink, message.channel_id)
                if urgent
                else f"{blocks.summary_text(views)}\n{permalink}",
            )

    async def _call(self, what: str, method: Any, /, **kwargs: Any) -> Any:
        """A Web API call whose failure is logged with context and does not stop the caller."""
        try:
            return await method(**kwargs)
        except SlackApiError as exc:
            log.warning(
                "%s failed (%s) for %s",
                what,
                exc.response.get("error"),
                {k: v for k, v in kwargs.items() if k in ("channel", "timestamp", "ts", "name")},
            )
            return None

    # ---- corrections -------------------------------------------------------------------------------
    async def find_message(
        self, session: AsyncSession, team_id: str, channel_id: str, ts: str
    ) -> Message | None:
        """The customer message at ``ts``, or the one whose bot reply is at ``ts``."""
        return await repo.get_message(session, team_id, channel_id, ts) or await repo.get_message_by_reply(
            session, team_id, channel_id, ts
        )

    async def on_reaction(
        self,
        team_id: str,
        user_id: str,
        reaction: str,
        channel_id: str,
        ts: str,
        event_id: str | None,
        added: bool,
    ) -> int | None:
        """Store what a reaction on a triaged message or its reply means.

        Returns the id of the message whose reply should be refreshed (``refresh_reply``), or ``None``.
        """
        action = self.reactions.get(reaction)
        if action is None or user_id == self.bot_user_id or not await self.is_agent(user_id):
            return None  # a customer's :bug: means nothing here, and nothing of it is stored
        async with self.sessions.begin() as session:
            if event_id and not await repo.record_event(session, event_id):
                return None
            message = await self.find_message(session, team_id, channel_id, ts)
            if message is None:
                return None
            prediction = await repo.latest_prediction(session, message.id)
            if prediction is None:
                return None
            if not added:
                changed = (
                    await repo.retract_correction(
                        session, message.id, user_id=user_id, reaction=reaction.split("::", 1)[0]
                    )
                    > 0
                )
            elif action.confirms:
                changed = await self._confirm_all(session, message, prediction, user_id, reaction)
            else:
                assert action.head is not None and action.label is not None
                changed = await self._correct(
                    session,
                    message,
                    prediction,
                    action.head,
                    action.label,
                    user_id,
                    CorrectionSource.REACTION,
                    reaction.split("::", 1)[0],
                )
        return message.id if changed else None

    async def on_label_selected(
        self,
        team_id: str,
        user_id: str,
        message_id: int,
        head: str,
        label: str,
        reply_channel: str,
        reply_ts: str,
    ) -> int | None:
        """Store a label picked in the reply's menus; returns the message id to refresh, or ``None``."""
        if not await self.is_agent(user_id):
            return None
        async with self.sessions.begin() as session:
            message = await session.get(Message, message_id)
            if (
                message is None
                or message.team_id != team_id
                or message.reply_ts != reply_ts
                or message.reply_channel_id != reply_channel
            ):
                return None  # the button does not belong to this reply
            prediction = await repo.latest_prediction(session, message.id)
            if prediction is None:
                return None
            changed = await self._correct(
                session, message, prediction, head, label, user_id, CorrectionSource.BUTTON, None
            )
        return message_id if changed else None

    async def _correct(
        self,
        session: AsyncSession,
        message: Message,
        prediction: Prediction,
        head: str,
        label: str,
        user_id: str,
        source: CorrectionSource,
        reaction: str | None,
    ) -> bool:
        heads = prediction.by_head()
        if head not in heads or label not in heads[head].scores:
            return False  # this model has no such head or label: nothing to learn from it
        current = await repo.current_label(session, message.id, head) or heads[head].label
        kind = (
            CorrectionKind.CONFIRMATION
            if label == heads[head].label and current == label
            else CorrectionKind.CORRECTION
        )
        await repo.add_correction(
            session,
            message.id,
            head,
            label,
            user_id=user_id,
            source=source,
            kind=kind,
            old_label=current,
            reaction=reaction,
        )
        return True

    async def _confirm_all(
        self, session: AsyncSession, message: Message, prediction: Prediction, user_id: str, reaction: str
    ) -> bool:
        labels = await repo.current_labels(session, message.id)
        for head, p in prediction.by_head().items():
            label = labels.get(head, p.label)
            await repo.add_correction(
                session,
                message.id,
                head,
                label,
                user_id=user_id,
                source=CorrectionSource.REACTION,
                kind=CorrectionKind.CONFIRMATION,
                old_label=label,
                reaction=reaction.split("::", 1)[0],
            )
        return True

    async def refresh_reply(self, message_id: int, menus_open: bool = False) -> None:
        """Rewrite the bot's reply to show the current labels and who set them."""
        async with self.sessions() as session:
            message = await session.get(Message, message_id)
            prediction = await repo.latest_prediction(session, message_id)
            if message is None or prediction is None or not message.reply_ts or not message.reply_channel_id:
                return
            human = await repo.latest_corrections(session, message_id)
        views: dict[str, LabelView] = {}
        labels: dict[str, list[str]] = {}
        by_head = prediction.by_head()
        for head in blocks.ordered_heads(list(by_head)):
            p = by_head[head]
            labels[head] = blocks.ordered_labels(head, list(p.scores))
            c = human.get(head)
            if c is None:
                views[head] = LabelView(label=p.label, confidence=p.confidence)
            else:
                views[head] = LabelView(
                    label=c.new_label,
                    predicted=p.label,
                    by=c.user_id,
                    confirmed=c.kind == CorrectionKind.CONFIRMATION,
                    before_edit=message.edited_at is not None and c.created_at < message.edited_at,
                )
        reply = blocks.reply_blocks(
            message_id,
            views,
            prediction.model_version,
            self.reactions,
            labels,
            self.settings.triage_unsure_below,
            menus_open=menus_open,
        )
        await self._call(
            "chat.update",
            self.client.chat_update,
            channel=message.reply_channel_id,
            ts=message.reply_ts,
            text=blocks.summary_text(views),
            blocks=reply,
        )

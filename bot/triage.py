"""What the bot does with Slack's events, free of Bolt: store, classify, reply, route, correct.

Every step that must not be lost is in the database first: a message is stored as pending before it is
classified, so a classifier that is down (or a crash) only delays the reply; the retry worker
(``run_pending``) picks it up, in this replica or another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from slack_sdk.errors import SlackApiError
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import blocks, lifecycle
from bot.agents import Agents
from bot.blocks import LabelView
from bot.cards import WHY_COUNT, CardDesk, is_urgent, unsure_urgent, why_references
from bot.delivery import DeliveryPolicy
from bot.drift import DriftMonitor
from bot.reactions import URGENT_MARKER, ReactionMap
from bot.settings import BotSettings, Delivery
from bot.slack_output import SlackOutput, is_permanent
from bot.storage import repository as repo
from bot.storage.database import first_in_line, in_transaction
from bot.storage.models import (
    CorrectionKind,
    CorrectionSource,
    Message,
    MessageState,
    Prediction,
    utcnow,
)
from classifier.client import Classifier
from classifier.logsafe import escape_controls
from classifier.results import MAX_CHARS, ClassifierError, HeadPrediction, InvalidInput

log = logging.getLogger(__name__)

NOT_A_REQUEST = "not_a_request"  # the topic label of messages that ask for nothing (classifier/schema.py)
# Slack's message metadata on every reply: how a later attempt recognises a reply already in the thread
REPLY_EVENT_TYPE = "triage_reply"
# Slack waits 3 s for an event's acknowledgement: storing must finish well within it, or Slack gets a 503
# (and delivers the event again) instead of a late 200 that it would count as a failure anyway
ACK_STORE_TIMEOUT_S = 2.5
# How long the bookkeeping after a reply retries through a database outage (bounded: an outage also stops
# the lease's renewal, and past TRIAGE_LEASE_S (2 minutes) the next attempt finds the reply in the thread)
RECORD_WITHIN_S = 60.0
# The database failing (or its pool not lending a connection in time), as opposed to a bug
DATABASE_ERRORS: tuple[type[BaseException], ...] = (SQLAlchemyError, OSError, TimeoutError)
# The database down, locked or unreachable, as opposed to refusing one statement's values
DATABASE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    OSError,
    TimeoutError,
)
# New messages stored in one transaction at most (11 bound parameters each: well under SQLite's limit)
STORE_BATCH = 100
# At a stop, answers under way get this long to finish; the bot's stop gives the background work 10 s
STOP_DRAIN_S = 5.0
# ... and handing the queued messages back to the database this long (it may be down)
HAND_BACK_WITHIN_S = 2.0


class StorageUnavailable(RuntimeError):
    """A Slack event could not be stored in time: answered 503 (not 200), so Slack delivers it again."""


class OutageLog:
    """Database failures, logged without flooding: the traceback once per outage (and at most once a
    minute: an outage that flaps while connections recover is one outage), then at most one line every
    ``LINE_EVERY_S`` counting the failures in between (at 50 msg/s a 30 s outage was 2,000 lines)."""

    TRACEBACK_EVERY_S = 60.0
    LINE_EVERY_S = 10.0

    def __init__(self) -> None:
        self.down = False
        self.last_traceback = -math.inf  # time.monotonic() of the last traceback logged
        self.last_line = -math.inf  # of the last line logged about a failure
        self.unlogged = 0  # failures since that line

    def failed(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if not self.down and now - self.last_traceback >= self.TRACEBACK_EVERY_S:
            self.last_traceback = self.last_line = now
            log.error("%s: database unavailable or too slow (traceback once per outage)", what, exc_info=exc)
        elif not self.down or now - self.last_line >= self.LINE_EVERY_S:
            reason = escape_controls(f"{type(exc).__name__}: {exc}".splitlines()[0])[:200]
            log.warning("%s: database unavailable or too slow (%s)%s", what, reason, self._since_last_line())
            self.last_line = now
        else:
            self.unlogged += 1
        self.down = True

    def recovered(self) -> None:
        if self.down:
            self.down = False
            log.warning("database reachable again%s", self._since_last_line())

    def _since_last_line(self) -> str:
        unlogged, self.unlogged = self.unlogged, 0
        return f"; {unlogged} more failure{'s' * (unlogged != 1)} since the last line" if unlogged else ""


@dataclass(frozen=True)
class IncomingMessage:
    team_id: str
    channel_id: str
    ts: str
    user_id: str | None
    text: str
    thread_ts: str | None = None
    event_id: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What became of a person's correction: the message whose reply and card to refresh, and a note only
    they see (``note_in``: the channel to show it in; ``None``: where they acted). Nothing is dropped
    silently: a correction that cannot apply says why."""

    refresh: int | None = None
    note: str | None = None
    note_in: str | None = None


NOTHING = Outcome()


@dataclass
class EarlyCorrections:
    """Corrections made before their message was classified, settled when it is: applied (``applied``),
    or refused because the model has no such label (``refused``: user id → why)."""

    applied: bool = False
    refused: list[tuple[str, str]] = field(default_factory=list)


def why_not_applicable(schema: Mapping[str, Collection[str]], head: str, label: str) -> str | None:
    """Why ``head: label`` cannot be stored for a prediction of a model with ``schema`` (head → labels),
    or ``None`` when it can."""
    shown = f"*{blocks.head_title(head)}: {label}*"  # named as the reply and card name it
    if head not in schema:
        return f"{shown} was not stored: the model has no {head} head"
    if label not in schema[head]:
        known = ", ".join(sorted(schema[head]))
        return f"{shown} was not stored: the model has no such {head} label (it knows {known})"
    return None


def _settle_store(store: asyncio.Future[bool]) -> None:
    """A store's failure was logged when its acknowledgement failed (or it finished after it): retrieved
    here so asyncio does not report it again."""
    if not store.cancelled():
        store.exception()


class StoreBatches:
    """Group commit of new messages before their acknowledgements: the messages that arrive while one
    transaction is being written go together in the next one (at most ``STORE_BATCH``), first in line
    for a database connection. Under load that is one transaction and a few statements for many events,
    instead of a transaction each waiting its turn behind the background work; alone, a message is
    written at once. A batch that fails for any reason but the database being unavailable is written
    again one message a transaction, so a message the database refuses fails only its own event."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], lease: timedelta = repo.DEFAULT_LEASE):
        self.sessions = sessions
        self.lease = lease  # a new message is leased to this process (``repo.claim_due_messages``)
        self._waiting: list[tuple[repo.NewMessage, asyncio.Future[Message | None]]] = []
        self._writer: asyncio.Future[None] | None = None

    async def store(self, new: repo.NewMessage) -> Message | None:
        """The new message as stored, or ``None`` when its event or the message was stored before."""
        stored: asyncio.Future[Message | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((new, stored))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_waiting())
        return await stored

    async def _write_waiting(self) -> None:
        with first_in_line():
            while self._waiting:
                batch, self._waiting = self._waiting[:STORE_BATCH], self._waiting[STORE_BATCH:]
                try:
                    await self._write(batch)
                finally:  # cancelled (the bot stopping): nobody waits forever
                    for _, stored in batch:
                        if not stored.done():
                            stored.cancel()

    async def _write(self, batch: list[tuple[repo.NewMessage, asyncio.Future[Message | None]]]) -> None:
        try:
            async with self.sessions.begin() as session:
                messages = await repo.store_new_messages(session, [new for new, _ in batch], lease=self.lease)
        except Exception as exc:
            if len(batch) == 1 or isinstance(exc, DATABASE_UNAVAILABLE):
                for _, stored in batch:
                    if not stored.done():
                        stored.set_exception(exc)
                return
            for item in batch:
                await self._write([item])
            return
        for (_, stored), message in zip(batch, messages, strict=True):
            if not stored.done():
                stored.set_result(message)


class Triage:
    def __init__(
        self,
        settings: BotSettings,
        sessions: async_sessionmaker[AsyncSession],
        classifier: Classifier,
        output: SlackOutput,
        reactions: ReactionMap,
        bot_user_id: str | None = None,
        agents: Agents | None = None,
    ):
        self.settings = settings
        self.agents = agents  # None: nobody is told apart (everyone's messages and labels count)
        self.bot_user_id = bot_user_id  # our own reactions are not corrections
        self.sessions = sessions
        self.classifier = classifier
        self.output = output  # every Web API write
        self.client = output.client  # reads (look-ups)
        self.reactions = reactions
        self.delivery = DeliveryPolicy(settings, output.client, agents)
        self.cards = CardDesk(settings, sessions, output, bot_user_id, agents)
        self.drift = DriftMonitor(settings, sessions, output)  # its figures are Prometheus gauges
        # bounded: under overload messages wait in the database, not in memory
        self.workers = settings.triage_workers
        self.queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=settings.triage_queue_size)
        # The leases of the messages queued or being answered here (message id → attempt), renewed while
        # they last however long they wait: a message is answered once, by the attempt holding its lease.
        self.lease = timedelta(seconds=settings.triage_lease_s)
        self.held: dict[int, int] = {}
        self.backlog: repo.Backlog | None = None  # as of the last sweep: for /healthz and /metrics
        self.outage = OutageLog()
        self._storing: set[asyncio.Future[bool]] = set()  # stores that outlived their acknowledgement
        self._reserved = 0  # room in the queue kept for messages being stored
        self._answering: set[int] = set()  # the messages workers are answering now
        self._answered = asyncio.Event()  # set whenever one of them is done
        self._stopping = False  # workers start nothing new
        self.store_batches = StoreBatches(sessions, self.lease)
        self.record_within_s = RECORD_WITHIN_S

    # ---- new messages ------------------------------------------------------------------------------
    async def on_message(self, incoming: IncomingMessage) -> bool:
        """Store once, before Slack gets its acknowledgement; returns whether it was queued to classify.

        Retries and racing replicas stop at the event id or the (team, channel, ts) key. A failure here
        propagates, so Slack gets an error and delivers the event again: an acknowledged message is
        always stored. A database that cannot store it within ``ACK_STORE_TIMEOUT_S`` raises
        ``StorageUnavailable`` (answered 503) rather than holding the acknowledgement past Slack's 3 s.
        Classification happens later in the bounded work queue.
        """
        text = repo.storable_text(incoming.text)
        if text != incoming.text:  # stored cleaned: a failure here would only make Slack send it again
            log.warning(
                "message %s in %s is not valid Unicode (lone surrogates or NUL): stored with U+FFFD instead",
                escape_controls(incoming.ts),
                escape_controls(incoming.channel_id),
            )
        # Awaited through a shield: a cancelled database call still waits for the driver (SQLite's busy
        # wait, a connection attempt), so the store goes on in the background and the 503 goes out now.
        # If it completes late, the message is stored and queued, and Slack's redelivery is a duplicate.
        store = asyncio.ensure_future(self._store_and_queue(incoming, text, not text.strip()))
        self._storing.add(store)
        store.add_done_callback(self._storing.discard)
        store.add_done_callback(_settle_store)
        try:
            queued = await asyncio.wait_for(asyncio.shield(store), ACK_STORE_TIMEOUT_S)
        except DATABASE_ERRORS as exc:
            where = f"{escape_controls(incoming.ts)} in {escape_controls(incoming.channel_id)}"
            self.outage.failed(f"message {where} not stored, Slack will deliver it again", exc)
            raise StorageUnavailable(f"message {where} not stored") from exc
        self.outage.recovered()
        return queued

    async def _store_and_queue(self, incoming: IncomingMessage, text: str, empty: bool) -> bool:
        # Room in the queue is reserved before the store: a message without room (overload) is stored
        # due now, for the sweep to queue, instead of stored leased and released in a second transaction,
        # which waited for the connection behind the background work and held acknowledgements past 2.5 s
        queued = not empty and self._reserve_room()
        try:
            message = await self._store(incoming, text, empty, leased=queued)
        finally:
            if queued:
                self._reserved -= 1
        if message is None or not queued:
            return False
        return await self.enqueue(message)

    def _reserve_room(self) -> bool:
        """Whether a message about to be stored will have room in the queue (then reserved for it)."""
        if self.queue.qsize() + self._reserved >= self.queue.maxsize:
            return False
        self._reserved += 1
        return True

    async def _store(self, incoming: IncomingMessage, text: str, empty: bool, leased: bool) -> Message | None:
        """The new message as stored (``leased`` to this process, or due now), or ``None`` when this event
        or message was stored before."""
        return await self.store_batches.store(
            repo.NewMessage(
                team_id=incoming.team_id,
                channel_id=incoming.channel_id,
                ts=incoming.ts,
                user_id=incoming.user_id,
                text=text,
                thread_ts=incoming.thread_ts,
                event_id=incoming.event_id,
                state=MessageState.SKIPPED if empty else MessageState.PENDING,
                leased=leased,
            )
        )

    async def enqueue(self, message: Message) -> bool:
        """Queue a pending message the caller holds the lease of; under overload it waits in the database."""
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:  # overload: it waits in the database, due now, for the sweep to queue it
            async with self.sessions.begin() as session:
                await repo.release_message(session, message.id, message.attempts)
            return False
        self.held[message.id] = message.attempts
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """The background work: ``workers`` classify queued messages, one sweep feeds due pending ones."""
        workers = [asyncio.ensure_future(self._worker()) for _ in range(self.workers)]
        workers.append(asyncio.ensure_future(self.cards.run(stop)))  # posts queued cards, urgent first
        workers.append(asyncio.ensure_future(self._keep_leases(stop)))
        try:
            await self._sweep(stop)
            await self._finish_answers()
        finally:  # messages still queued or in flight stay pending in the database: nothing is lost
            queued = {i: a for i, a in self.held.items() if i not in self._answering}
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        await self._hand_back(queued)

    async def _finish_answers(self) -> None:
        """A stop: workers start nothing new, and the answers under way get ``STOP_DRAIN_S`` to finish."""
        self._stopping = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_DRAIN_S):
                while self._answering:
                    await self._answered.wait()
                    self._answered.clear()

    async def _hand_back(self, queued: dict[int, int]) -> None:
        """At a stop (a deploy, Ctrl-C), the leases of the messages that waited in the queue here run out
        now: the next start, or another replica, answers them at once instead of after ``TRIAGE_LEASE_S``.
        An answer cut short keeps its lease: its reply may still be on its way to Slack, and the attempt
        that takes over after the lease finds it in the thread (``_adopt_posted_reply``). If the database
        cannot be reached within ``HAND_BACK_WITHIN_S``, they wait for their leases, as before."""
        self.held.clear()
        if not queued:
            return
        try:
            async with asyncio.timeout(HAND_BACK_WITHIN_S), self.sessions.begin() as session:
                handed = await repo.renew_leases(session, queued, lease=timedelta(0))
        except DATABASE_ERRORS as exc:
            reason = str(exc) or type(exc).__name__  # a timeout says nothing of itself
            log.warning("stopping: %d queued message(s) wait for their leases (%s)", len(queued), reason)
            return
        log.info("stopping: %d queued message(s) left for the next start to answer at once", len(handed))

    async def _worker(self) -> None:
        while True:
            message = await self.queue.get()
            if self._stopping:  # stays held: handed back with the queue
                self.queue.task_done()
                continue
            self._answering.add(message.id)
            try:
                if self.held.get(message.id) == message.attempts:  # else its lease went to another attempt
                    await self.classify_and_reply(message)
            except repo.LeaseLost as exc:  # it outlived its lease: the attempt that took over answers it
                log.info("%s; left to the attempt holding it", exc)
            except SQLAlchemyError as exc:  # stays pending: its lease expires and the sweep queues it again
                self.outage.failed(f"answering message {message.id}", exc)
            except Exception:  # stays pending: its lease expires and the sweep queues it again
                log.exception("classifying message %s failed", message.id)
            finally:
                if self.held.get(message.id) == message.attempts:
                    del self.held[message.id]
                self._answering.discard(message.id)
                self._answered.set()
                self.queue.task_done()

    async def run_pending(self) -> int:
        """Queue pending messages that are due (classifier was down, or a worker died); returns how many."""
        room = self.queue.maxsize - self.queue.qsize() - self._reserved
        if room <= 0:
            return 0
        async with self.sessions.begin() as session:
            claimed = await repo.claim_due_messages(session, limit=room, lease=self.lease)
        for message in claimed:
            self.held[message.id] = message.attempts  # renewed while it waits for the room
            await self.queue.put(message)  # new messages may have taken the room meanwhile: wait for it
        return len(claimed)

    async def _keep_leases(self, stop: asyncio.Event) -> None:
        """Renew the leases of the messages held here four times a lease, so that none runs out while its
        message waits in the queue or is being answered (a slow classifier, a rate-limited post). Those
        that could not be renewed are another attempt's now: dropped here."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.lease.total_seconds() / 4)
            held = dict(self.held)
            if not held:
                continue
            try:
                async with self.sessions.begin() as session:
                    kept = await repo.renew_leases(session, held, lease=self.lease)
            except DATABASE_ERRORS as exc:  # the sweep reports outages; a lease lost meanwhile is fenced
                log.debug("renewing %d leases failed: %s", len(held), exc)
                continue
            for message_id, attempt in held.items():
                if message_id not in kept and self.held.get(message_id) == attempt:
                    del self.held[message_id]

    async def _sweep(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.run_pending()
                async with self.sessions() as session:
                    self.backlog = await repo.backlog(session)
                self.outage.recovered()
            except DATABASE_ERRORS as exc:  # a database outage must not end the loop, nor flood the log
                self.outage.failed("pending-message sweep", exc)
            except Exception:  # nor anything else
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
        """Answer a message this attempt holds the lease of (``message.attempts``): every write about it is
        made under that lease (``_as_holder``), so an attempt that outlived it stops (``LeaseLost``) and
        the message is classified and answered once."""
        if message.text is None:  # forgotten user: stored without text, nothing to classify
            await self._as_holder(message, lambda s: repo.mark_skipped(s, message.id, reason="no text"))
            return
        if await self._written_by_agent(message):  # kept (without its text) only so it is not taken again

            async def skip(session: AsyncSession) -> None:
                await repo.remove_text(session, message.id)
                await repo.mark_skipped(session, message.id, reason="written by an agent")

            await self._as_holder(message, skip)
            return
        started = time.perf_counter()
        try:
            # very long messages are classified on their beginning (the model cuts at its max length
            # anyway) and stored whole; the same pass finds why this label for the card and modal
            result = await self.classifier.classify([message.text[:MAX_CHARS]], neighbors=WHY_COUNT)
        except InvalidInput as exc:  # retrying cannot help
            reason = f"not classifiable: {exc}"
            await self._as_holder(message, lambda s: repo.mark_skipped(s, message.id, reason=reason))
            return
        except (ClassifierError, OSError) as exc:  # unavailable, overloaded, unreachable: later
            await self._retry_later(message, f"classifier: {exc}")
            return
        latency_ms = (time.perf_counter() - started) * 1000
        text_result = result.results[0]
        views = {h: LabelView(label=p.label, confidence=p.confidence) for h, p in text_result.heads.items()}

        early = EarlyCorrections()  # made while it waited: applied (or refused) with its prediction

        async def record(session: AsyncSession, card: bool = False) -> None:
            await repo.hold_lease(session, message.id, message.attempts, lease=self.lease)
            await repo.add_prediction(
                session,
                message.id,
                result.model_version,
                text_result.heads,
                latency_ms=latency_ms,
                neighbors=why_references(text_result.neighbors),
            )
            await repo.mark_classified(session, message.id)
            early.applied, early.refused = False, []  # a retried transaction settles them again
            await self._settle_early_corrections(session, message.id, text_result.heads, early)
            if card:  # queued in the same transaction: a classified message never lacks its card
                await repo.queue_card(session, message.id, urgent=is_urgent(views, self.settings))

        if lifecycle.is_thread_reply(message) or (message.edited_at and message.reply_ts):
            await lifecycle.reclassified(self, message, views, record)  # bot/lifecycle.py
            await self._after_early_corrections(message, early)
            return
        if self.is_not_a_request(views):  # thanks, greetings: stored and classified, nothing posted
            await self._in_transaction(record)  # (card delivery: no card either)
            await self._after_early_corrections(message, early)
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
        mode = await self.delivery.mode_for(message.channel_id, [message.user_id])
        if mode == Delivery.THREAD and not await self._reply_in_thread(message, text, reply):
            return

        await self._in_transaction(lambda session: record(session, card=mode == Delivery.CARD))
        if mode == Delivery.CARD:
            self.cards.wake.set()
        await self._route(message, views, mode)
        await self._after_early_corrections(message, early)

    async def _settle_early_corrections(
        self,
        session: AsyncSession,
        message_id: int,
        predicted: Mapping[str, HeadPrediction],
        early: EarlyCorrections,
    ) -> None:
        """Corrections made before the message was classified count from its first prediction on: a label
        this model has is applied (the model's label becomes their ``old_label``); one it lacks is
        retracted, and its author is told why (``_after_early_corrections``)."""
        schema = {head: list(p.scores) for head, p in predicted.items()}
        for correction in await repo.unapplied_corrections(session, message_id):
            why = why_not_applicable(schema, correction.head, correction.new_label)
            if why is not None:
                correction.retracted_at = utcnow()
                early.refused.append((correction.user_id, why))
                continue
            correction.old_label = predicted[correction.head].label
            if correction.old_label == correction.new_label:
                correction.kind = CorrectionKind.CONFIRMATION
            early.applied = True

    async def _after_early_corrections(self, message: Message, early: EarlyCorrections) -> None:
        """Show what became of corrections made before the message was classified."""
        for user_id, why in early.refused:
            await self.output.ephemeral(message.channel_id, user_id, why)
        if early.applied:
            await self.refresh_reply(message.id)  # reply, card, escalation: the agents' labels

    async def _reply_in_thread(self, message: Message, text: str, reply: list[dict[str, Any]]) -> bool:
        """The triage reply in the message's thread; ``False`` when it could not be posted (the message is
        then skipped or scheduled for a retry)."""
        if message.reply_channel_id and not message.reply_ts and not await self._adopt_posted_reply(message):
            return False
        if message.reply_ts and message.reply_channel_id:
            # an earlier attempt replied but could not record the rest: update that reply, never post twice
            await self.output.update(message.reply_channel_id, message.reply_ts, text, blocks=reply)
        elif not await self._post_reply(message, text, reply):
            return False
        return True

    def is_not_a_request(self, views: Mapping[str, LabelView]) -> bool:
        """The model is sure the message asks for nothing ("thanks!", "hi all", "works now")."""
        topic = views.get("topic")
        return (
            topic is not None
            and topic.label == NOT_A_REQUEST
            and topic.confidence is not None
            and topic.confidence >= self.settings.triage_not_a_request_above
        )

    async def _post_reply(self, message: Message, text: str, reply: list[dict[str, Any]]) -> bool:
        """Post the threaded reply and record it; returns whether it is in Slack.

        At most one reply, wherever this process dies (``kill -9``, a database outage): (1) the intent
        (``reply_channel_id`` without ``reply_ts``) is committed before chat.postMessage is called, so a
        death before it leaves nothing in Slack, and a failure to commit it posts nothing; (2) the reply
        carries metadata naming the message; (3) a later attempt that finds the intent without a ts looks
        for that reply in the thread first and adopts it (``_adopt_posted_reply``), posting only if it is
        not there, and if it cannot look it waits for the next attempt. The message's lease, renewed while
        this attempt lasts and checked with the intent, keeps two attempts from overlapping.
        """
        await self.output.pacer.wait(message.channel_id)  # first, so the post follows the intent at once

        async def intent(session: AsyncSession) -> None:  # only the attempt holding the lease may post
            await repo.hold_lease(session, message.id, message.attempts, lease=self.lease)
            await repo.record_reply_intent(session, message.id, channel_id=message.channel_id)

        await self._in_transaction(intent)
        message.reply_channel_id = message.channel_id
        try:
            posted = await self.output.post_or_raise(
                message.channel_id,
                text,
                blocks=reply,
                thread_ts=message.ts,
                metadata={
                    "event_type": REPLY_EVENT_TYPE,
                    "event_payload": {"message_id": message.id, "attempt": message.attempts},
                },
                paced=False,
            )
        except SlackApiError as exc:
            await self._reply_failed(message, "chat.postMessage", exc)
            return False
        await self._record_reply(message, str(posted["channel"]), str(posted["ts"]))
        return True

    async def _adopt_posted_reply(self, message: Message) -> bool:
        """An earlier attempt may have posted the reply and died before recording it: look in the thread.

        Returns ``False`` when the thread could not be read (the message waits for a later attempt; posting
        blind could answer twice); ``True`` otherwise, with ``message.reply_ts`` set if the reply was found.
        """
        try:
            found = await self.output.find_own_post(
                event_type=REPLY_EVENT_TYPE,
                message_id=message.id,
                bot_user_id=self.bot_user_id,
                channel=message.channel_id,
                ts=message.ts,
            )
        except SlackApiError as exc:
            await self._reply_failed(message, "conversations.replies", exc)
            return False
        if found is not None:
            log.info("message %s: adopted the reply an earlier attempt posted", message.id)
            await self._record_reply(message, message.channel_id, found)
        return True

    async def _record_reply(self, message: Message, channel: str, ts: str) -> None:
        # recorded on its own and at once: whatever fails next, a retry finds the reply and updates it
        await self._in_transaction(lambda s: repo.set_reply(s, message.id, channel_id=channel, ts=ts))
        message.reply_channel_id, message.reply_ts = channel, ts

    async def _reply_failed(self, message: Message, method: str, exc: SlackApiError) -> None:
        error = f"{method}: {exc.response.get('error')}"
        if is_permanent(exc):
            log.warning("message %s in %s skipped: %s", message.ts, message.channel_id, error)
            await self._as_holder(message, lambda s: repo.mark_skipped(s, message.id, reason=error))
        else:
            await self._retry_later(message, error)

    async def _in_transaction(self, work: Callable[[AsyncSession], Awaitable[Any]]) -> None:
        """Bookkeeping after a reply went out: retried with back-off for up to ``RECORD_WITHIN_S``, so a
        short database outage does not leave it for the next attempt to find in the thread."""
        await in_transaction(self.sessions, work, within_s=self.record_within_s)

    async def _as_holder(self, message: Message, work: Callable[[AsyncSession], Awaitable[Any]]) -> None:
        """``work`` in a transaction, only while this attempt holds the message's lease (``LeaseLost``)."""
        async with self.sessions.begin() as session:
            await repo.hold_lease(session, message.id, message.attempts, lease=self.lease)
            await work(session)

    async def _retry_later(self, message: Message, error: str) -> None:
        where = f"{escape_controls(message.ts)} in {escape_controls(message.channel_id)}"
        log.warning("message %s not answered yet: %s", where, escape_controls(error))
        await self._as_holder(
            message,
            lambda s: repo.schedule_retry(
                s,
                message.id,
                error=error,
                base_delay=timedelta(seconds=self.settings.triage_retry_base_s),
                max_delay=timedelta(seconds=self.settings.triage_retry_max_s),
            ),
        )

    async def _route(self, message: Message, views: Mapping[str, LabelView], mode: Delivery) -> None:
        """Urgent messages: escalated (a post in the escalation channel, and in thread mode a reaction on
        the original), except that with a card an unsure urgent prediction is flagged there for a look
        instead; topic routes."""
        escalate = is_urgent(views, self.settings) and not (
            mode == Delivery.CARD and unsure_urgent(views, self.settings)
        )
        if escalate and mode == Delivery.THREAD:
            await self.output.react(message.channel_id, message.ts, URGENT_MARKER)
        if escalate:
            await self.cards.escalate(message.id, by=None)
            await self.cards.refresh(message.id)  # a card posted meanwhile shows it
        topic = views.get("topic")
        route = self.settings.routes.get(topic.label) if topic else None
        if not route or (escalate and route == self.settings.triage_escalation_channel):
            return  # one post even if a route and escalation coincide
        link = blocks.permalink_or_note(await self.output.permalink(message.channel_id, message.ts))
        await self.output.post_text(route, f"{blocks.summary_text(views)}\n{link}", None)

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
    ) -> Outcome:
        """Store what a reaction on a triaged message or its reply means; the outcome names the message
        whose reply should be refreshed (``after_reaction``) and what to tell the agent."""
        action = self.reactions.get(reaction)
        if action is None or user_id == self.bot_user_id or not await self.is_agent(user_id):
            return NOTHING  # a customer's :bug: means nothing here, and nothing of it is stored
        name = reaction.split("::", 1)[0]
        async with self.sessions.begin() as session:
            if event_id and not await repo.record_event(session, event_id):
                return NOTHING
            message = await self.find_message(session, team_id, channel_id, ts)
            if message is None:
                return NOTHING
            if not added:  # a correction kept for a message not classified yet is retracted the same way
                retracted = await repo.retract_correction(session, message.id, user_id=user_id, reaction=name)
                return Outcome(refresh=message.id if retracted else None)
            prediction = await repo.latest_prediction(session, message.id)
            if action.confirms:
                if prediction is None:
                    return Outcome(note="Nothing to confirm yet: the message is not classified yet.")
                await self._confirm_all(
                    session, message, prediction, user_id, CorrectionSource.REACTION, name
                )
                return Outcome(refresh=message.id)
            assert action.head is not None and action.label is not None
            return await self.record_label(
                session,
                message,
                prediction,
                action.head,
                action.label,
                user_id,
                CorrectionSource.REACTION,
                name,
            )

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
            outcome = await self.record_label(
                session, message, prediction, head, label, user_id, CorrectionSource.BUTTON, None
            )
        return outcome.refresh

    async def on_labels_submitted(
        self, team_id: str, user_id: str, message_id: int, labels: Mapping[str, str]
    ) -> Outcome:
        """Store the labels an agent chose in the Fix labels modal (those that differ from the current
        ones). A label the model lacks (a modal opened before a model with other labels took over) is
        answered with a note in the card channel, or the message's channel without one."""
        async with self.sessions.begin() as session:
            message = await session.get(Message, message_id)
            if message is None or message.team_id != team_id:
                return NOTHING
            prediction = await repo.latest_prediction(session, message_id)
            if prediction is None:
                return NOTHING
            predicted = prediction.by_head()
            current = await repo.standing_labels(session, message_id)
            changed, notes = False, []
            for head, label in labels.items():
                shown = current.get(head) or (predicted[head].label if head in predicted else None)
                if label != shown:
                    outcome = await self.record_label(
                        session, message, prediction, head, label, user_id, CorrectionSource.BUTTON, None
                    )
                    changed |= outcome.refresh is not None
                    notes += [outcome.note] if outcome.note else []
        return Outcome(
            refresh=message_id if changed else None,
            note="\n".join(notes) or None,
            note_in=self.cards.channel or message.channel_id,
        )

    async def mark_not_a_request(self, team_id: str, user_id: str, message_id: int) -> Outcome:
        """The card's "Not a request": this agent's label ``topic: not_a_request``, the label the model
        learns noise by (trained on like any correction); the card records who said it."""
        async with self.sessions.begin() as session:
            message = await session.get(Message, message_id)
            if message is None or message.team_id != team_id:
                return NOTHING
            prediction = await repo.latest_prediction(session, message_id)
            outcome = await self.record_label(
                session, message, prediction, "topic", NOT_A_REQUEST, user_id, CorrectionSource.BUTTON, None
            )
            if outcome.refresh is not None:
                (await repo.ensure_card(session, message_id)).not_request_by = user_id
        return replace(outcome, note_in=self.cards.channel or message.channel_id)

    async def record_label(
        self,
        session: AsyncSession,
        message: Message,
        prediction: Prediction | None,
        head: str,
        label: str,
        user_id: str,
        source: CorrectionSource,
        reaction: str | None = None,
    ) -> Outcome:
        """Store one person's label for one head: the one place every way of labelling comes through
        (reactions, the reply's menus, the Fix labels modal, Not a request, review Confirm, the shortcut).

        ``old_label`` is the label standing when they labelled it: the latest person's label not retracted,
        else the model's (``prediction``'s). A message's labels so read as a history (``a → b``, then
        ``b → c``), and on a message nobody labelled yet it is the model's label. The label is a
        confirmation when it is that standing label (they agreed with what was shown), a correction
        otherwise. A label the model lacks is not stored (the outcome says why). Before the message is
        classified (``prediction`` None) the label is kept without an ``old_label`` and settled with the
        first prediction (``_settle_early_corrections``)."""
        if prediction is None:
            await repo.add_correction(
                session, message.id, head, label, user_id=user_id, source=source, reaction=reaction
            )
            note = f"*{blocks.head_title(head)}: {label}* is kept: it applies once the message is classified."
            return Outcome(note=note)
        heads = prediction.by_head()
        why = why_not_applicable({h: list(p.scores) for h, p in heads.items()}, head, label)
        if why is not None:
            return Outcome(note=why)
        standing = await repo.standing_label(session, message.id, head) or heads[head].label
        await repo.add_correction(
            session,
            message.id,
            head,
            label,
            user_id=user_id,
            source=source,
            kind=CorrectionKind.CONFIRMATION if label == standing else CorrectionKind.CORRECTION,
            old_label=standing,
            reaction=reaction,
        )
        return Outcome(refresh=message.id)

    async def on_confirmed(self, team_id: str, user_id: str, message_id: int) -> bool:
        """An agent confirmed every head's current label (a review item's Confirm); whether it was stored."""
        async with self.sessions.begin() as session:
            message = await session.get(Message, message_id)
            if message is None or message.team_id != team_id:
                return False
            prediction = await repo.latest_prediction(session, message_id)
            if prediction is None:
                return False
            return await self._confirm_all(
                session, message, prediction, user_id, CorrectionSource.BUTTON, reaction=None
            )

    async def _confirm_all(
        self,
        session: AsyncSession,
        message: Message,
        prediction: Prediction,
        user_id: str,
        source: CorrectionSource,
        reaction: str | None,
    ) -> bool:
        """Confirm every head's standing label (a person's, else the model's); whether any was stored."""
        labels = await repo.standing_labels(session, message.id)
        stored = False
        for head, p in prediction.by_head().items():
            outcome = await self.record_label(
                session, message, prediction, head, labels.get(head, p.label), user_id, source, reaction
            )
            stored |= outcome.refresh is not None
        return stored

    async def after_reaction(self, message_id: int, user_id: str, channel_id: str) -> None:
        """Show the agent their correction: the reply and card are rewritten, and where no reply shows it
        (card or silent mode) an ephemeral note in the channel they reacted in tells them what it did."""
        await self.refresh_reply(message_id)
        async with self.sessions() as session:
            message = await session.get(Message, message_id)
            prediction = await repo.latest_prediction(session, message_id)
            human = await repo.standing_corrections(session, message_id)
        if message is None or prediction is None or message.reply_ts:
            return
        views, _ = blocks.current_views(prediction.by_head(), human)
        note = f"Triage updated: {blocks.summary_text(views)}"
        if self.cards.channel:
            note += f" (card in <#{self.cards.channel}>)"
        await self.output.ephemeral(channel_id, user_id, note)

    async def refresh_reply(self, message_id: int, menus_open: bool = False) -> None:
        """Rewrite the bot's reply and card to show the current labels and who set them; escalation
        follows the labels."""
        await self.cards.follow_labels(message_id)
        await self.cards.refresh(message_id)
        async with self.sessions() as session:
            message = await session.get(Message, message_id)
            prediction = await repo.latest_prediction(session, message_id)
            if message is None or prediction is None or not message.reply_ts or not message.reply_channel_id:
                return
            human = await repo.standing_corrections(session, message_id)
        views, labels = blocks.current_views(prediction.by_head(), human, message.edited_at)
        reply = blocks.reply_blocks(
            message_id,
            views,
            prediction.model_version,
            self.reactions,
            labels,
            self.settings.triage_unsure_below,
            menus_open=menus_open,
        )
        await self.output.update(
            message.reply_channel_id, message.reply_ts, blocks.summary_text(views), blocks=reply
        )

"""The review queue (active learning): the recent messages whose label would teach the model most.

A message needs a human look when a head is below ``TRIAGE_UNSURE_BELOW``, when it is a borderline "not a
request" (silenced or nearly so), when two agents gave it different labels, or when its predicted class
has been wrong often lately (live accuracy from confirmations and corrections). The queue is ranked by the
model's uncertainty (one minus the margin between its two most likely labels, on the least sure head;
agents disagreeing counts as fully uncertain), and near-duplicates ("order 4411 is late" / "order 4412 is
late") are collapsed into the best-ranked one.

Agents see it with ``/triage review`` (privately), on App Home and in the daily digest; each item has
Confirm (every head's current label becomes a human label: trained on and judged on like a correction)
and Fix (the Fix labels modal of ``bot/cards.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import blocks, cards
from bot.settings import BotSettings
from bot.storage import repository as repo
from bot.storage.models import Message, utcnow

if TYPE_CHECKING:
    from slack_bolt.async_app import AsyncApp

    from bot.agents import Agents
    from bot.triage import Triage

CONFIRM_ACTION = "review_confirm"
NOT_A_REQUEST = "not_a_request"  # the topic label of messages that ask for nothing
WINDOW = timedelta(days=14)  # how far back the queue looks
SCAN_LIMIT = 2000  # the newest messages of the window that are ranked
BORDERLINE = 0.1  # a "not a request" this close to TRIAGE_NOT_A_REQUEST_ABOVE (either side) is borderline
ACCURACY_WINDOW = timedelta(days=30)  # a class's live accuracy, for "often wrong lately"
LOW_ACCURACY = 0.7
MIN_JUDGED = 5  # judgments a class needs before its live accuracy counts
SHOWN = 5  # items shown in a message (Slack: 50 blocks; each item takes three)

Later = Callable[[Awaitable[Any], str], None]


@dataclass(frozen=True)
class ReviewItem:
    message: Message
    model_version: str
    labels: dict[str, str]  # head -> the label shown now (a person's over the model's)
    reasons: list[str]
    uncertainty: float  # 0 (sure) .. 1 (a coin toss, or agents disagree)
    similar: int = 0  # near-duplicates collapsed into this one


@dataclass(frozen=True)
class Queue:
    items: list[ReviewItem]  # best first
    generated_at: datetime = field(default_factory=utcnow)

    @property
    def size(self) -> int:
        return len(self.items)


def margin_uncertainty(scores: Mapping[str, float]) -> float:
    """One minus the gap between the two most likely labels: 0 when sure, 1 when a tie."""
    top = sorted((float(p) for p in scores.values()), reverse=True)[:2]
    if not top:
        return 0.0
    return 1.0 - (top[0] - (top[1] if len(top) > 1 else 0.0))


_DIGITS = re.compile(r"\d+")
_NOT_WORD = re.compile(r"[^\w]+")


def near_duplicate_key(text: str) -> str:
    """The same for texts that differ only in case, accents, punctuation, spacing or numbers."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    folded = "".join(c for c in folded if not unicodedata.combining(c))
    normalized = " ".join(_NOT_WORD.sub(" ", _DIGITS.sub("0", folded)).split())
    return hashlib.sha1(normalized.encode()).hexdigest()


def low_accuracy_classes(judged: list[repo.Judged]) -> dict[tuple[str, str], float]:
    """(head, predicted label) -> live accuracy, for classes judged enough times and often wrong."""
    return {
        (j.head, j.predicted): j.right / j.judged
        for j in judged
        if j.judged >= MIN_JUDGED and j.right / j.judged < LOW_ACCURACY
    }


def rank(
    candidates: list[repo.Candidate], settings: BotSettings, weak: Mapping[tuple[str, str], float]
) -> list[ReviewItem]:
    """The candidates that need a look, best first, near-duplicates collapsed."""
    found: list[ReviewItem] = []
    for candidate in candidates:
        item = _review_item(candidate, settings, weak)
        if item is not None:
            found.append(item)
    found.sort(key=lambda i: (-i.uncertainty, -i.message.received_at.timestamp(), -i.message.id))
    kept: dict[str, ReviewItem] = {}
    for item in found:
        key = near_duplicate_key(item.message.text or "")
        first = kept.get(key)
        kept[key] = item if first is None else dataclasses.replace(first, similar=first.similar + 1)
    return list(kept.values())


def _review_item(
    candidate: repo.Candidate, settings: BotSettings, weak: Mapping[tuple[str, str], float]
) -> ReviewItem | None:
    heads = candidate.prediction.by_head()
    disagreed = [h for h, by_user in candidate.labels_by_user.items() if len(set(by_user.values())) > 1]
    if candidate.labels_by_user and not disagreed:
        return None  # a person labelled it already (and nobody disagrees): nothing more to learn
    reasons = [f"agents disagree on {blocks.head_title(h).lower()}" for h in sorted(disagreed)]
    for head in blocks.ordered_heads(list(heads)):  # reasons in the order the reply shows the heads
        p = heads[head]
        if p.confidence < settings.triage_unsure_below:
            reasons.append(f"unsure of {blocks.head_title(head).lower()} ({p.confidence:.0%})")
        accuracy = weak.get((head, p.label))
        if accuracy is not None:
            reasons.append(f"{p.label} is often wrong lately ({accuracy:.0%} right)")
    topic = heads.get("topic")
    if (
        topic is not None
        and topic.label == NOT_A_REQUEST
        and abs(topic.confidence - settings.triage_not_a_request_above) < BORDERLINE
    ):
        reasons.append(f"borderline not a request ({topic.confidence:.0%})")
    if not reasons:
        return None
    uncertainty = 1.0 if disagreed else max(margin_uncertainty(p.scores) for p in heads.values())
    labels = {h: p.label for h, p in heads.items()} | candidate.labels
    return ReviewItem(candidate.message, candidate.prediction.model_version, labels, reasons, uncertainty)


class ReviewQueue:
    """The queue as of now, computed from the database on demand (ranking runs off the event loop)."""

    def __init__(self, settings: BotSettings, sessions: async_sessionmaker[AsyncSession]):
        self.settings = settings
        self.sessions = sessions

    async def current(self, now: datetime | None = None) -> Queue:
        now = now or utcnow()
        async with self.sessions() as session:
            candidates = await repo.review_candidates(session, since=now - WINDOW, limit=SCAN_LIMIT)
            judged = await repo.live_accuracy(session, since=now - ACCURACY_WINDOW, until=now)
        items = await asyncio.to_thread(rank, candidates, self.settings, low_accuracy_classes(judged))
        return Queue(items, now)


# ---- Block Kit ------------------------------------------------------------------------------------------
def item_blocks(item: ReviewItem) -> list[dict[str, Any]]:
    """One item: the message quoted with its labels, why it is here, and Confirm / Fix."""
    value = str(item.message.id)
    labels = " · ".join(
        f"{blocks.head_title(h)}: *{item.labels[h]}*" for h in blocks.ordered_heads(list(item.labels))
    )
    why = "; ".join(item.reasons)
    if item.similar:
        why += f" (+{item.similar} similar)"
    return [
        {
            "type": "section",
            "block_id": f"review_item:{value}",
            "text": {  # the quote on lines of its own: "> " quotes only at the start of a line
                "type": "mrkdwn",
                "text": f"In <#{item.message.channel_id}>:\n{cards.quote(item.message)}\n{labels}"[:3000],
            },
        },
        {"type": "context", "elements": [{"type": "mrkdwn", "text": why[:3000]}]},
        {
            "type": "actions",
            "block_id": f"review:{value}",
            "elements": [
                cards.button(CONFIRM_ACTION, "Confirm", value, "primary"),
                cards.button(cards.FIX_ACTION, "Fix labels", value),
            ],
        },
    ]


def queue_blocks(queue: Queue, shown: int = SHOWN) -> list[dict[str, Any]]:
    """The top ``shown`` items under a headline; a friendly line when nothing waits."""
    if not queue.items:
        return [_mrkdwn("*Review queue:* nothing waits for a look :tada:")]
    count = f"{queue.size} message would" if queue.size == 1 else f"{queue.size} messages would"
    top = "" if queue.size <= shown else f"; the top {shown}"
    headline = f"*Review queue:* {count} teach the model most{top}:"
    found: list[dict[str, Any]] = [_mrkdwn(headline)]
    for item in queue.items[:shown]:
        found.extend(item_blocks(item))
    return found


def _mrkdwn(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}


# ---- Slack's side ---------------------------------------------------------------------------------------
HomeRefresh = Callable[[str], Awaitable[None]]


async def answer_command(queue: ReviewQueue, respond: Any) -> None:
    """``/triage review``: the top items, privately, in place of the "Looking…" acknowledgement."""
    shown = queue_blocks(await queue.current())
    await respond(response_type="ephemeral", replace_original=True, text="Review queue", blocks=shown)


def register(
    app: AsyncApp,
    triage: Triage,
    agents: Agents,
    queue: ReviewQueue,
    later: Later,
    refresh_home: HomeRefresh | None = None,
) -> None:
    """Confirm on an item (Fix is the card's button: ``bot/cards.py`` opens the modal). Only agents."""

    @app.action(CONFIRM_ACTION)
    async def confirm(ack: Any, body: dict[str, Any], action: dict[str, Any], respond: Any) -> None:
        await ack()
        user_id = str((body.get("user") or {}).get("id") or "")
        team_id = str((body.get("team") or {}).get("id") or "")
        channel_id = str((body.get("channel") or {}).get("id") or "")
        try:
            message_id = int(str(action.get("value")))
        except ValueError:
            return
        if not user_id or not await agents.is_agent(user_id):
            if channel_id:
                later(
                    triage.output.ephemeral(channel_id, user_id, "Only agents can change triage."), "refusal"
                )
            return
        if not await triage.on_confirmed(team_id, user_id, message_id):
            return
        later(triage.refresh_reply(message_id), "card update after a review")
        container = body.get("container") or {}
        if container.get("type") == "view" and refresh_home is not None:
            later(refresh_home(user_id), "App Home after a review")
        elif container.get("is_ephemeral"):
            later(answer_command(queue, respond), "review queue after a confirmation")
        elif channel_id:
            later(triage.output.ephemeral(channel_id, user_id, "Confirmed: thank you."), "review note")

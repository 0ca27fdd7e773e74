"""The "Triage this message" message shortcut: an agent labels any message (a thread reply, an old
message, one in a channel the bot does not watch) in the Fix labels modal, prefilled by the model.

The modal opens at once (a trigger_id is good for three seconds) and is filled in when the classifier
answers, with why this label as cards show it. Submitting stores the message, the model's prediction and
every chosen label as a human label. Between the two, the message travels in the modal's
``private_metadata`` (Slack's limit: 3,000 characters), so whichever replica gets the submission can
store it; a longer text is stored cut to fit (the model reads far less than that anyway).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bot import blocks, cards
from bot.blocks import LabelView
from bot.storage import repository as repo
from bot.storage.models import Card, Correction, CorrectionSource, Message, MessageState
from bot.triage import NOTHING, Outcome, Triage
from classifier.logsafe import escape_controls
from classifier.results import MAX_CHARS, ClassifierError, ClassifyResult, InvalidInput, Neighbor

if TYPE_CHECKING:
    from slack_bolt.async_app import AsyncApp

    from bot.agents import Agents

log = logging.getLogger(__name__)
Later = Callable[[Awaitable[Any], str], None]

CALLBACK = "triage_message"  # the shortcut's callback_id (manifest.yaml) and its modal's
METADATA_LIMIT = 3000  # Slack's private_metadata


@dataclass(frozen=True)
class Target:
    """The message the shortcut was used on."""

    team_id: str
    channel_id: str
    ts: str
    thread_ts: str | None
    user_id: str | None
    text: str

    def metadata(self) -> str:
        """As ``private_metadata``: the text cut until the JSON fits Slack's limit."""
        fields = {k: v for k, v in self.__dict__.items() if v is not None}
        text = self.text
        while True:
            encoded = json.dumps({**fields, "text": text})
            if len(encoded) <= METADATA_LIMIT:
                return encoded
            # escaped characters take up to six: shrink in proportion, at least one character a round
            text = text[: min(len(text) - 1, len(text) * METADATA_LIMIT // len(encoded))]

    @classmethod
    def from_metadata(cls, raw: Any) -> Target | None:
        try:
            fields = json.loads(str(raw))
        except ValueError:
            return None
        if not isinstance(fields, dict):
            return None
        required = ("team_id", "channel_id", "ts", "text")
        if not all(isinstance(fields.get(k), str) for k in required):
            return None
        optional = {
            k: fields.get(k) if isinstance(fields.get(k), str) else None for k in ("thread_ts", "user_id")
        }
        return cls(**{k: fields[k] for k in required}, **optional)


def target_of(body: Mapping[str, Any]) -> Target | None:
    """The message of a ``message_action`` payload, or ``None`` when it has no text to label."""
    message = body.get("message") or {}
    team = str((body.get("team") or {}).get("id") or "")
    channel = str((body.get("channel") or {}).get("id") or "")
    ts, text = message.get("ts"), message.get("text")
    if not (team and channel and isinstance(ts, str) and isinstance(text, str) and text.strip()):
        return None
    thread_ts = message.get("thread_ts") if isinstance(message.get("thread_ts"), str) else None
    user_id = message.get("user") if isinstance(message.get("user"), str) else None
    return Target(team, channel, ts, thread_ts, user_id, text)


def modal(
    target: Target,
    result: ClassifyResult | None,
    note: str | None = None,
    why: Sequence[Neighbor] = (),
    standing: Mapping[str, Correction] | None = None,
) -> dict[str, Any]:
    """The Fix labels modal of ``bot/cards.py`` for a message that may not be stored yet, with why this
    label (``why_of``); before the model answered (``result`` None) it says so and cannot be submitted.
    Prefilled as a card shows the labels: people's ``standing`` labels over the model's, so saving the
    modal unchanged confirms what stands instead of reverting a colleague's correction."""
    message = Message(channel_id=target.channel_id, ts=target.ts, text=target.text)
    views: dict[str, LabelView] = {}
    labels: dict[str, list[str]] = {}
    if result is not None:
        views, labels = blocks.current_views(result.results[0].heads, standing or {})
    content = cards.CardContent(
        message,
        Card(),
        views,
        labels,
        result.model_version if result else "",
        cards.Requester(None, ""),
        None,
        why,
    )
    view = cards.fix_labels_view(content)
    view.update(callback_id=CALLBACK, private_metadata=target.metadata())
    view["title"] = {"type": "plain_text", "text": "Triage this message"}
    if result is None:
        view.pop("submit")
        view["blocks"].append(
            {"type": "context", "elements": [{"type": "mrkdwn", "text": note or "Classifying…"}]}
        )
    return view


async def store_labels(
    triage: Triage, target: Target, result: ClassifyResult, chosen: Mapping[str, str], user_id: str
) -> Outcome:
    """Store the message (unless it is stored already), the prediction (unless it has one), and every
    chosen label as this person's (``Triage.record_label``: on a message nobody labelled yet, one left as
    the model had it is a confirmation). Nothing is stored when no label fits the model."""
    heads = result.results[0].heads
    valid = {h: label for h, label in chosen.items() if h in heads and label in heads[h].scores}
    if not valid:
        return NOTHING
    async with triage.sessions.begin() as session:
        message, created = await repo.store_message(
            session,
            team_id=target.team_id,
            channel_id=target.channel_id,
            ts=target.ts,
            user_id=target.user_id,
            text=target.text,
            thread_ts=target.thread_ts,
            state=MessageState.CLASSIFIED,
        )
        prediction = None if created else await repo.latest_prediction(session, message.id)
        if prediction is None:
            neighbors = cards.why_references(result.results[0].neighbors)
            prediction = await repo.add_prediction(
                session, message.id, result.model_version, heads, neighbors=neighbors
            )
            await repo.mark_classified(session, message.id)
        outcomes = [
            await triage.record_label(
                session, message, prediction, head, label, user_id, CorrectionSource.BUTTON
            )
            for head, label in valid.items()
        ]
    stored = any(o.refresh is not None for o in outcomes)
    notes = "\n".join(o.note for o in outcomes if o.note)
    return Outcome(refresh=message.id if stored else None, note=notes or None, note_in=target.channel_id)


async def standing_of(triage: Triage, target: Target) -> dict[str, Correction]:
    """People's labels standing on the message, if it is stored (head -> correction)."""
    async with triage.sessions() as session:
        message = await repo.get_message(session, target.team_id, target.channel_id, target.ts)
        return await repo.standing_corrections(session, message.id) if message else {}


async def why_of(triage: Triage, result: ClassifyResult) -> list[Neighbor]:
    """Why this label, as a card shows it: read back by reference (``cards.stored_why``), so a Slack
    message whose text is gone (its author forgotten, the message deleted) is left out here too."""
    async with triage.sessions() as session:
        return await cards.stored_why(session, cards.why_references(result.results[0].neighbors))


def register(app: AsyncApp, triage: Triage, agents: Agents, later: Later) -> None:
    """The shortcut and its modal's submission. Only agents label."""
    output = triage.output

    async def classify(target: Target) -> tuple[ClassifyResult | None, str | None]:
        """The model's labels, with the training messages most like it (why this label)."""
        try:
            text = target.text[:MAX_CHARS]
            return await triage.classifier.classify([text], neighbors=cards.WHY_COUNT), None
        except InvalidInput as exc:
            return None, f"This message cannot be classified: {exc}"
        except (ClassifierError, OSError) as exc:
            log.warning("the shortcut's classification failed: %s", escape_controls(exc))
            return None, "The classifier is not available right now; please try again in a minute."

    @app.shortcut(CALLBACK)
    async def shortcut(ack: Any, body: dict[str, Any]) -> None:
        await ack()
        user_id = str((body.get("user") or {}).get("id") or "")
        channel_id = str((body.get("channel") or {}).get("id") or "")
        trigger_id = body.get("trigger_id")
        if not await agents.is_agent(user_id):
            if user_id and channel_id:
                later(output.ephemeral(channel_id, user_id, "Only agents can triage messages."), "refusal")
            return
        target = target_of(body)
        if target is None or not isinstance(trigger_id, str):
            if channel_id:
                later(output.ephemeral(channel_id, user_id, "That message has no text to triage."), "note")
            return
        opened = await output.open_view(trigger_id, modal(target, None))  # at once: within Slack's 3 s
        view_id = ((opened or {}).get("view") or {}).get("id")
        if not view_id:
            return

        async def prefill() -> None:
            result, problem = await classify(target)  # the classifier's work runs off the event loop
            why = await why_of(triage, result) if result is not None else []
            standing = await standing_of(triage, target)
            await output.update_view(str(view_id), modal(target, result, problem, why, standing))

        later(prefill(), "the shortcut's prediction")

    @app.view(CALLBACK)
    async def submitted(ack: Any, body: dict[str, Any], view: dict[str, Any]) -> None:
        await ack()  # closes the modal
        user_id = str((body.get("user") or {}).get("id") or "")
        target = Target.from_metadata(view.get("private_metadata"))
        if target is None or not await agents.is_agent(user_id):
            return
        chosen = cards.submitted_labels(view)

        async def store() -> None:
            result, problem = await classify(target)
            if result is None:
                log.warning("the shortcut's labels were not stored: %s", problem)
                return
            outcome = await store_labels(triage, target, result, chosen, user_id)
            if outcome.note and outcome.note_in:
                await output.ephemeral(outcome.note_in, user_id, outcome.note)
            if outcome.refresh is not None:
                await triage.refresh_reply(outcome.refresh)  # a triaged message's reply and card show them

        later(store(), "the shortcut's labels")

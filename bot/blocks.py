"""Block Kit messages: the threaded triage reply, its label menus, the /classify answer, and what a
retraining run posts."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from bot.reactions import ReactionMap
from bot.storage.models import TrainingRun, TrainingStatus
from classifier.schema import DEFAULT_HEADS

if TYPE_CHECKING:  # bot.retrain builds on this module
    from bot.retrain import RunOutcome

FIX_ACTION = "triage_fix"  # button: open the Fix labels modal (bot/cards.py)
DONE_ACTION = "triage_fix_done"  # button: close them
SET_ACTION_PREFIX = "triage_set:"  # static_select per head: "triage_set:<head>"
MAX_OPTIONS = 100  # Slack's limit for a static_select
# Slack's broadcasts (<!channel>, <!here>, <!everyone>) and user-group mentions (<!subteam^S1|@team>)
_BROADCAST = re.compile(r"<!(channel|here|everyone)(?:\|[^>]*)?>|<!subteam\^[^|>]*(?:\|@?([^>]*))?>")
_CUT_MARKUP = re.compile(r"&\w*$|<[^>]*$")  # an escaped character or a <@mention|link> cut short


def defused(text: str) -> str:
    """Slack-formatted text (as Slack sends it: escaped, with <...> entities) made safe to repeat in a
    post: broadcasts and user-group mentions become plain words, so quoting a customer who wrote
    ``<!channel>`` never notifies a whole channel."""
    return _BROADCAST.sub(lambda m: f"@{m.group(1) or m.group(2) or 'group'}", text)


def cut(text: str, limit: int) -> str:
    """``text`` shortened to ``limit`` characters with an ellipsis; never half an entity, mention or link."""
    if len(text) <= limit:
        return text
    return _CUT_MARKUP.sub("", text[: limit - 1]) + "…"


def quoted(text: str, limit: int) -> str:
    """Someone's Slack text as a block quote, defused and cut to ``limit`` characters."""
    return "> " + cut(defused(text), limit).replace("\n", "\n> ")


@dataclass(frozen=True)
class LabelView:
    """What the reply shows for one head: the model's label, or a person's correction of it."""

    label: str
    confidence: float | None = None  # the model's confidence; None once a person set the label
    predicted: str | None = None  # the model's label when a person changed it
    by: str | None = None  # user id of the person who corrected or confirmed it
    confirmed: bool = False
    before_edit: bool = False  # a person's label for the text as it was before its author edited it


def _default_first(known: Sequence[str], names: Sequence[str]) -> list[str]:
    return sorted(names, key=lambda n: (known.index(n) if n in known else len(known), n))


def ordered_heads(heads: Sequence[str]) -> list[str]:
    """Display order: the default heads as the product defines them, then others alphabetically.

    Stored predictions do not keep the model's order (PostgreSQL's JSONB sorts keys), so it is derived.
    """
    return _default_first(list(DEFAULT_HEADS), heads)


def ordered_labels(head: str, labels: Sequence[str]) -> list[str]:
    """Menu order: e.g. urgency low → critical for the default heads, alphabetical otherwise."""
    return _default_first(DEFAULT_HEADS.get(head, []), labels)


def head_title(head: str) -> str:
    return head.replace("_", " ").capitalize()


def _label_line(head: str, view: LabelView, unsure_below: float) -> str:
    line = _label_text(head, view, unsure_below)
    return f"{line}  _(given before the message was edited)_" if view.before_edit else line


def _label_text(head: str, view: LabelView, unsure_below: float) -> str:
    title = f"*{head_title(head)}:*"
    if view.by and view.predicted and view.predicted != view.label:
        return f"{title} ~{view.predicted}~ → *{view.label}*  _corrected by <@{view.by}>_"
    if view.by and view.confirmed:
        return f"{title} {view.label}  _confirmed by <@{view.by}>_"
    if view.by:
        return f"{title} *{view.label}*  _set by <@{view.by}>_"
    conf = f"  `{view.confidence:.0%}`" if view.confidence is not None else ""
    unsure = (
        "  :grey_question: _unsure_" if view.confidence is not None and view.confidence < unsure_below else ""
    )
    return f"{title} {view.label}{conf}{unsure}"


def summary_text(views: Mapping[str, LabelView]) -> str:
    """Plain-text fallback (notifications, screen readers)."""
    parts = []
    for head, v in views.items():
        conf = f" ({v.confidence:.0%})" if v.confidence is not None else ""
        parts.append(f"{head_title(head)}: {v.label}{conf}")
    return " · ".join(parts)


CONFIRM_MEANING = "all labels right"  # what the confirm emoji means, in the hint and on App Home
HINT_FIRST = "urgency"  # what people most need to fix fast is named first in the reaction hint
MAX_HINTS = 8


def _reaction_hint(views: Mapping[str, LabelView], reactions: ReactionMap) -> str:
    hints = []
    for head in sorted(views, key=lambda h: h != HINT_FIRST):
        emoji_of = {a.label: e for e, a in reactions.actions.items() if a.head == head and a.label}
        for label in ordered_labels(head, list(emoji_of)):
            if len(hints) < MAX_HINTS:
                hints.append(f":{emoji_of[label]}: {label}")
    confirm = reactions.confirm_emoji()
    if confirm:
        hints.append(f":{confirm}: {CONFIRM_MEANING}")
    return "React to correct: " + " · ".join(hints) if hints else ""


def _select(head: str, labels: Sequence[str], current: str) -> dict[str, Any]:
    options = [
        {"text": {"type": "plain_text", "text": label[:75]}, "value": label[:150]}
        for label in list(labels)[:MAX_OPTIONS]
    ]
    select: dict[str, Any] = {
        "type": "static_select",
        "action_id": f"{SET_ACTION_PREFIX}{head}",
        "placeholder": {"type": "plain_text", "text": head_title(head)[:150]},
        "options": options,
    }
    initial = next((o for o in options if o["value"] == current), None)
    if initial:
        select["initial_option"] = initial
    return select


def reply_blocks(
    message_id: int,
    views: Mapping[str, LabelView],
    model_version: str,
    reactions: ReactionMap,
    labels: Mapping[str, Sequence[str]],
    unsure_below: float = 0.5,
    menus_open: bool = False,
    truncated: bool = False,
) -> list[dict[str, Any]]:
    """The threaded reply under a customer message."""
    lines = [_label_line(h, v, unsure_below) for h, v in views.items()]
    notes = [f"model {model_version}"]
    if truncated:
        notes.append("long message: classified on its beginning")
    hint = _reaction_hint(views, reactions)
    if hint:
        notes.append(hint)
    blocks: list[dict[str, Any]] = [
        {"type": "section", "block_id": "labels", "text": {"type": "mrkdwn", "text": "\n".join(lines)}},
        {
            "type": "context",
            "block_id": "notes",
            "elements": [{"type": "mrkdwn", "text": " · ".join(notes)[:3000]}],
        },
    ]
    value = str(message_id)
    if menus_open:
        elements: list[dict[str, Any]] = [
            _select(h, labels.get(h, [v.label]), v.label) for h, v in views.items()
        ]
        elements = elements[:24]
        elements.append(
            {
                "type": "button",
                "action_id": DONE_ACTION,
                "value": value,
                "text": {"type": "plain_text", "text": "Done"},
            }
        )
        blocks.append({"type": "actions", "block_id": f"fix:{value}", "elements": elements})
    else:
        blocks.append(
            {
                "type": "actions",
                "block_id": f"fix:{value}",
                "elements": [
                    {
                        "type": "button",
                        "action_id": FIX_ACTION,
                        "value": value,
                        "text": {"type": "plain_text", "text": "Fix labels"},
                    }
                ],
            }
        )
    return blocks


def current_views(
    predicted: Mapping[str, Any], human: Mapping[str, Any], edited_at: datetime | None = None
) -> tuple[dict[str, LabelView], dict[str, list[str]]]:
    """Each head's label as shown now (a person's correction over the model's prediction), and each head's
    labels in menu order. ``predicted``: head → PredictionHead; ``human``: head → latest Correction;
    ``edited_at``: when the message's text last changed (labels given before then are marked)."""
    views: dict[str, LabelView] = {}
    labels: dict[str, list[str]] = {}
    for head in ordered_heads(list(predicted)):
        p = predicted[head]
        labels[head] = ordered_labels(head, list(p.scores))
        c = human.get(head)
        if c is None:
            views[head] = LabelView(label=p.label, confidence=p.confidence)
        else:
            views[head] = LabelView(
                label=c.new_label,
                predicted=p.label,
                by=c.user_id,
                confirmed=c.kind == "confirmation",
                before_edit=edited_at is not None and c.created_at < edited_at,
            )
    return views, labels


def label_lines(views: Mapping[str, LabelView], unsure_below: float) -> str:
    """One line per head: label, confidence or who set it, unsure ones marked."""
    return "\n".join(_label_line(h, v, unsure_below) for h, v in views.items())


CLASSIFY_QUOTE_CHARS = 280


def classify_blocks(
    text: str, views: Mapping[str, LabelView], model_version: str, unsure_below: float = 0.5
) -> list[dict[str, Any]]:
    """The private answer to ``/classify``."""
    lines = [_label_line(h, v, unsure_below) for h, v in views.items()]
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": quoted(text, CLASSIFY_QUOTE_CHARS)}},
        {"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": f"model {model_version}"}]},
    ]


NO_PERMALINK = "(no link: Slack did not give one)"


def permalink_or_note(permalink: str | None) -> str:
    """A message's permalink, or a plain note that there is none (never a raw message ts)."""
    return permalink or NO_PERMALINK


def escalation_text(views: Mapping[str, LabelView], permalink: str, channel_id: str) -> str:
    urgency = views.get("urgency")
    level = urgency.label if urgency else "urgent"
    return f":rotating_light: *{level}* message in <#{channel_id}>: {summary_text(views)}\n{permalink}"


# ---- retraining: the progress thread, the summary, and the answer while a run is going -----------------
def retrain_progress_text(event: Mapping[str, Any]) -> str | None:
    """One progress event of a run as a line for Slack (``None``: nothing to say)."""
    kind = event.get("event")
    if kind == "busy":
        return str(event.get("message") or "Retraining is already running.")
    if kind == "dataset":
        return (
            f":hourglass_flowing_sand: Retraining from {event['incumbent']}: {event['train']} training "
            f"rows ({event['feedback']} from Slack feedback), {event['heldout']} held out."
        )
    if kind == "epoch":
        return (
            f"epoch {event['epoch']}/{event['epochs']}: validation macro-F1 {event['val_macro_f1']:.3f}, "
            f"about {event['eta_s'] / 60:.0f} min left"
        )
    return None


def retrain_summary_text(outcome: RunOutcome) -> str:
    """A finished run: promoted or rejected (with the figures and why), or why it failed."""
    if outcome.status == TrainingStatus.FAILED:
        return f":x: Retraining failed: {outcome.error}"
    head = (
        f":rocket: *{outcome.candidate}* promoted (was {outcome.incumbent})"
        if outcome.status == TrainingStatus.PROMOTED
        else f":no_entry: *{outcome.candidate}* rejected; {outcome.incumbent} stays active"
    )
    lines = [head]
    for h in ordered_heads(list(outcome.deltas)):
        d = outcome.deltas[h]
        lines.append(
            f"  • {head_title(h)}: macro-F1 {d['incumbent']:.3f} → {d['candidate']:.3f} ({d['delta']:+.3f}), "
            f"accuracy {d['incumbent_accuracy']:.3f} → {d['candidate_accuracy']:.3f}"
        )
    c = outcome.counts
    lines.append(
        f"  trained on {c.get('train', 0)} examples ({c.get('feedback', 0)} from Slack feedback, "
        f"{c.get('accepted', 0)} accepted predictions), "
        f"judged on {c.get('heldout', 0)} held-out examples ({c.get('heldout_feedback', 0)} from Slack)"
    )
    if outcome.reasons and outcome.status != TrainingStatus.PROMOTED:
        lines.append("  why: " + "; ".join(outcome.reasons))
    return "\n".join(lines)


def retrain_busy_text(running: TrainingRun | None, slack: bool = True) -> str:
    """What to tell someone who asks for a run while another holds the lock (``slack``: a mention)."""
    if running is None:
        return "Retraining is already running."
    who = str(running.trigger)
    if running.requested_by:
        who = f"<@{running.requested_by}>" if slack else running.requested_by
    when = f"{running.started_at:%Y-%m-%d %H:%M} UTC"
    if running.status == TrainingStatus.QUEUED:
        return f"Retraining is already queued for the worker, asked by {who} at {when}."
    return f"Retraining is already running, started by {who} at {when}."

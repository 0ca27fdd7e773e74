"""App Home: what the model does and what to teach it, published (``views.publish``) when someone opens it.

Agents see their recent labels as recorded, the review queue with its buttons, and the reaction cheat
sheet. Admins also see the active model and its metrics, live accuracy per head over 7 and 30 days (from
confirmations and corrections), the correction rate, the backlog, the last runs, and two controls:
Retrain (the dry-run summary in a confirmation modal) and Rollback (a select of versions).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from bot import blocks, review
from bot.reactions import ReactionMap
from bot.storage import repository as repo
from bot.storage.models import Correction, TrainingRun, utcnow
from classifier.results import ClassifierError

if TYPE_CHECKING:
    from slack_bolt.async_app import AsyncApp

    from bot.commands import Commands
    from bot.triage import Triage

log = logging.getLogger(__name__)
Later = Callable[[Awaitable[Any], str], None]

RETRAIN_ACTION = "home_retrain"
ROLLBACK_ACTION = "home_rollback"
RETRAIN_CALLBACK = "home_retrain_confirm"
RECENT_LABELS = 10
LAST_RUNS = 5
VERSIONS_SHOWN = 25
ACCURACY_WINDOWS = (7, 30)  # days


def _text(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}


def _header(text: str) -> dict[str, Any]:
    return {"type": "header", "text": {"type": "plain_text", "text": text[:150]}}


def correction_line(c: Correction) -> str:
    """One label as it was recorded: when, where, which head, from what to what, how, and if retracted."""
    where = f"<#{c.message.channel_id}>" if c.message is not None else "a message"
    head = blocks.head_title(c.head)
    if c.kind == "confirmation":
        what = f"{head}: confirmed *{c.new_label}*"
    else:
        what = f"{head}: ~{c.old_label or '?'}~ → *{c.new_label}*"
    how = f"by :{c.reaction}:" if c.reaction else f"by {c.source}"
    line = f"{c.created_at:%Y-%m-%d %H:%M} · {where} · {what} ({how})"
    return f"~{line}~ _retracted_" if c.retracted_at else line


def accuracy_lines(judged_by_window: dict[int, list[repo.Judged]]) -> list[str]:
    """Live accuracy per head, one line per window: right / judged."""
    lines = []
    for days, judged in judged_by_window.items():
        per_head: dict[str, tuple[int, int]] = {}
        for j in judged:
            right, total = per_head.get(j.head, (0, 0))
            per_head[j.head] = (right + j.right, total + j.judged)
        shown = ", ".join(
            f"{blocks.head_title(h)} {r / n:.0%} ({r}/{n})" for h, (r, n) in sorted(per_head.items())
        )
        lines.append(f"• last {days} days: {shown or 'nothing judged yet'}")
    return lines


TRIGGERS = {"schedule": "scheduled", "command": "asked in Slack", "cli": "from the command line"}


def run_line(run: TrainingRun) -> str:
    """One run: when (UTC, as everywhere), how it was started, and how it ended."""
    outcome = str(run.status) + (f" ({run.candidate_version})" if run.candidate_version else "")
    if run.error:
        outcome += f": {run.error[:150]}"
    how = TRIGGERS.get(str(run.trigger), str(run.trigger))
    return f"• {run.started_at:%Y-%m-%d %H:%M} UTC, {how}: {outcome}"


def cheat_sheet(reactions: ReactionMap) -> str:
    """Each emoji and what it sets, head by head in the reply's order, labels in menu order; the confirm
    emoji last, named as the reply's hint names it."""
    by_head: dict[str, dict[str, str]] = {}  # head -> label -> emoji
    for emoji, action in reactions.actions.items():
        if action.head and action.label:
            by_head.setdefault(action.head, {}).setdefault(action.label, emoji)
    lines = [
        f":{by_head[head][label]}: {blocks.head_title(head)} → {label}"
        for head in blocks.ordered_heads(list(by_head))
        for label in blocks.ordered_labels(head, list(by_head[head]))
    ]
    lines += [f":{emoji}: {blocks.CONFIRM_MEANING}" for emoji, a in reactions.actions.items() if a.confirms]
    return "\n".join(lines)


class Home:
    def __init__(self, triage: Triage, commands: Commands):
        self.triage = triage
        self.commands = commands
        self.settings = commands.settings
        self.sessions = commands.sessions

    async def publish(self, user_id: str, note: str | None = None) -> None:
        """Publish ``user_id``'s Home; ``note``: the outcome of what they just did there, on top."""
        view = await self.view(user_id)
        if note:
            view["blocks"] = [_text(note), *view["blocks"]][:100]
        await self.triage.output.publish_view(user_id, view)

    async def view(self, user_id: str, now: datetime | None = None) -> dict[str, Any]:
        now = now or utcnow()
        if not await self.commands.agents.is_agent(user_id):
            shown = [_text("This app triages customer messages for the support team.")]
            return {"type": "home", "blocks": shown}
        shown = [_header("Triage"), *await self.agent_blocks(user_id)]
        if self.settings.is_admin(user_id):
            shown += [{"type": "divider"}, _header("Model (admins)"), *await self.admin_blocks(now)]
        return {"type": "home", "blocks": shown[:100]}

    async def agent_blocks(self, user_id: str) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            labels = await repo.recent_corrections(session, user_id, limit=RECENT_LABELS)
        mine = "\n".join(correction_line(c) for c in labels) or "None yet: react on a reply or use a card."
        return [
            _text(f"*Your recent labels*\n{mine}"),
            {"type": "divider"},
            *review.queue_blocks(await self.commands.review.current()),
            {"type": "divider"},
            _text("*Reactions*\n" + cheat_sheet(self.triage.reactions)),
        ]

    async def admin_blocks(self, now: datetime) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            judged = {
                days: await repo.live_accuracy(session, since=now - timedelta(days=days), until=now)
                for days in ACCURACY_WINDOWS
            }
            week = await repo.stats_since(session, now - timedelta(days=7))
            runs = await repo.list_training_runs(session, limit=LAST_RUNS)
        rate = f"{week.corrections / week.predictions:.1%}" if week.predictions else "n/a"
        try:
            status = await self.commands.status()
        except ClassifierError as exc:  # a classifier server that is down must not blank the page
            status = f"*Model:* the classifier does not answer ({exc})"
        shown = [
            _text(status),
            _text("*Live accuracy* (messages people labelled)\n" + "\n".join(accuracy_lines(judged))),
            _text(
                f"*Correction rate, last 7 days:* {rate} ({week.corrections} corrections of "
                f"{week.predictions} predictions)"
            ),
            _text("*Last runs*\n" + ("\n".join(run_line(r) for r in runs) or "none yet")),
        ]
        controls: list[dict[str, Any]] = []
        if self.commands.retrainer is not None:
            controls.append(
                {
                    "type": "button",
                    "action_id": RETRAIN_ACTION,
                    "text": {"type": "plain_text", "text": "Retrain…"},
                    "value": "retrain",
                }
            )
        versions = await self._versions()
        if versions:
            controls.append(
                {
                    "type": "static_select",
                    "action_id": ROLLBACK_ACTION,
                    "placeholder": {"type": "plain_text", "text": "Roll back to…"},
                    "options": [
                        {"text": {"type": "plain_text", "text": label[:75]}, "value": name[:150]}
                        for name, label in versions
                    ],
                }
            )
        if controls:
            shown.append({"type": "actions", "block_id": "home_admin", "elements": controls})
        return shown

    async def _versions(self) -> list[tuple[str, str]]:
        """(name, what the select shows) of the newest versions one could switch to, newest first."""
        try:
            versions = await self.triage.classifier.models()
        except ClassifierError as exc:
            log.warning("App Home: the classifier lists no versions (%s)", exc)
            return []
        return [
            (v.name, f"{v.name} ({v.status})")
            for v in reversed(versions[-VERSIONS_SHOWN:])
            if v.status not in ("active", "rejected")
        ]


def retrain_modal(summary: str | None) -> dict[str, Any]:
    """Retrain? with the dry run's summary (``None``: still being computed: no Start button yet)."""
    view: dict[str, Any] = {
        "type": "modal",
        "callback_id": RETRAIN_CALLBACK,
        "title": {"type": "plain_text", "text": "Retrain the model"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [_text(summary if summary is not None else "Looking at the feedback…")],
    }
    if summary is not None:
        view["submit"] = {"type": "plain_text", "text": "Start"}
    return view


def register(app: AsyncApp, triage: Triage, commands: Commands, later: Later) -> Home:
    """``app_home_opened`` and the admins' controls; returns the Home for others to republish."""
    home = Home(triage, commands)
    settings = commands.settings

    @app.event("app_home_opened")
    async def opened(event: dict[str, Any]) -> None:
        if event.get("tab", "home") == "home" and event.get("user"):
            later(home.publish(str(event["user"])), "App Home")

    def admin_of(body: dict[str, Any]) -> str | None:
        user_id = str((body.get("user") or {}).get("id") or "")
        return user_id if settings.is_admin(user_id) else None

    @app.action(RETRAIN_ACTION)
    async def retrain(ack: Any, body: dict[str, Any]) -> None:
        await ack()
        trigger_id = body.get("trigger_id")
        if admin_of(body) is None or commands.retrainer is None or not isinstance(trigger_id, str):
            return
        opened = await triage.output.open_view(trigger_id, retrain_modal(None))  # within Slack's 3 s
        view_id = ((opened or {}).get("view") or {}).get("id")
        if view_id and commands.retrainer is not None:
            retrainer = commands.retrainer

            async def summarize() -> None:
                try:
                    summary = await retrainer.busy_message() or await retrainer.dry_run()
                    modal = retrain_modal(summary)
                except Exception as exc:  # the admin must hear back, whatever failed
                    log.exception("the dry run for App Home failed")
                    modal = retrain_modal(f"The dry run failed: {type(exc).__name__}. See the bot's log.")
                    modal.pop("submit")
                await triage.output.update_view(str(view_id), modal)

            later(summarize(), "retrain dry run")

    @app.view(RETRAIN_CALLBACK)
    async def confirmed(ack: Any, body: dict[str, Any]) -> None:
        await ack()
        user_id = admin_of(body)
        if user_id is None or commands.retrainer is None:
            return
        async with commands.sessions.begin() as session:
            await repo.add_audit_entry(session, user_id=user_id, action="retrain", args={}, allowed=True)
        channel = settings.triage_summary_channel or settings.triage_escalation_channel
        retrainer = commands.retrainer

        async def start() -> None:
            started = await retrainer.request(requested_by=user_id, notify_channel=channel)
            await home.publish(user_id, note=started)

        later(start(), "retrain from Home")

    @app.action(ROLLBACK_ACTION)
    async def rollback(ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        user_id = admin_of(body)
        version = (action.get("selected_option") or {}).get("value")
        if user_id is None or not isinstance(version, str):
            return

        async def switch() -> None:
            await home.publish(user_id, note=await commands.rollback(user_id, version))

        later(switch(), "rollback from Home")

    return home

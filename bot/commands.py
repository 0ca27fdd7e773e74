"""Slash commands: ``/classify <text>`` and ``/triage status|models|review`` for agents, ``/triage
retrain|rollback`` for admins. Customers never see labels or confidences, so ``/classify`` is refused to
them like ``/triage status``."""

from __future__ import annotations

import asyncio
import logging
import shlex
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import blocks, review
from bot.agents import Agents
from bot.blocks import LabelView
from bot.settings import BotSettings
from bot.storage import repository as repo
from classifier.client import Classifier
from classifier.logsafe import escape_controls
from classifier.registry import ModelStatus
from classifier.results import ClassifierError, ClassifierUnavailable, InvalidInput
from classifier.schema import schema_heads

if TYPE_CHECKING:
    from bot.retrain import Retrainer

log = logging.getLogger(__name__)

Ack = Callable[..., Awaitable[None]]
Later = Callable[[Awaitable[Any], str], None]

CLASSIFY_USAGE = (
    "Usage: `/classify <message text>`: I answer privately with its topic, urgency and sentiment."
)
TRIAGE_USAGE = (
    "*/triage* commands:\n"
    "• `/triage status`: active model, its metrics, feedback since the last training, the last run (agents)\n"
    "• `/triage models`: model versions (agents)\n"
    "• `/triage review`: the messages whose labels would teach the model most (agents)\n"
    "• `/triage retrain [--dry-run]`: retrain on the corrections (admins)\n"
    "• `/triage rollback VERSION`: switch the active model back (admins)"
)
ADMIN_ONLY = {"retrain", "rollback"}
AGENTS_ONLY = {"status", "models", "review"}  # model internals, the last run's error, customers' messages
# Slack wants an answer to a slash command within 3 s; leave room for the network.
CLASSIFY_INLINE_BUDGET_S = 2.0


class Commands:
    def __init__(
        self,
        settings: BotSettings,
        sessions: async_sessionmaker[AsyncSession],
        classifier: Classifier,
        agents: Agents,
        retrainer: Retrainer | None = None,
    ):
        self.settings = settings
        self.sessions = sessions
        self.classifier = classifier
        self.agents = agents
        self.retrainer = retrainer
        self.review = review.ReviewQueue(settings, sessions)

    # ---- /classify ---------------------------------------------------------------------------------
    async def classify(self, ack: Ack, respond: Any, command: dict[str, Any]) -> None:
        text = (command.get("text") or "").strip()
        if not text:
            await ack(response_type="ephemeral", text=CLASSIFY_USAGE)
            return
        if not await self.agents.is_agent(command.get("user_id", "")):
            await ack(response_type="ephemeral", text=refusal("/classify"))
            return
        task = asyncio.ensure_future(self._classify_blocks(text))
        done, _ = await asyncio.wait({task}, timeout=CLASSIFY_INLINE_BUDGET_S)
        if done:  # answer in the acknowledgement itself: the fastest path
            await ack(response_type="ephemeral", **task.result())
            return
        await ack(response_type="ephemeral", text="Classifying…")
        await respond(response_type="ephemeral", replace_original=True, **await task)

    async def _classify_blocks(self, text: str) -> dict[str, Any]:
        try:
            result = await self.classifier.classify([text])
        except InvalidInput as exc:
            return {"text": f"I can't classify that: {exc}"}
        except (ClassifierUnavailable, ClassifierError) as exc:
            log.warning("/classify failed: %s", escape_controls(exc))
            return {"text": "The classifier is not available right now; please try again in a minute."}
        r = result.results[0]
        views = {h: LabelView(label=p.label, confidence=p.confidence) for h, p in r.heads.items()}
        return {
            "text": blocks.summary_text(views),
            "blocks": blocks.classify_blocks(
                text, views, result.model_version, self.settings.triage_unsure_below
            ),
        }

    # ---- /triage -----------------------------------------------------------------------------------
    async def triage(self, ack: Ack, respond: Any, command: dict[str, Any], later: Later) -> None:
        try:
            words = shlex.split(command.get("text") or "")
        except ValueError:
            words = (command.get("text") or "").split()
        sub, args = (words[0].lower(), words[1:]) if words else ("help", [])
        user = command.get("user_id", "")
        if sub in ADMIN_ONLY and not self.settings.is_admin(user):
            await self._audit(user, sub, args, allowed=False, reason="not an admin")
            await ack(
                response_type="ephemeral",
                text=f"Sorry, `/triage {sub}` is for triage admins only. Ask one of "
                f"{', '.join(f'<@{a}>' for a in self.settings.triage_admins) or 'your Slack admins'}.",
            )
            return
        if sub in AGENTS_ONLY and not await self.agents.is_agent(user):
            await ack(response_type="ephemeral", text=refusal(f"/triage {sub}"))
            return
        if sub == "status":
            await ack(response_type="ephemeral", text="Collecting status…")
            later(self._respond(respond, self.status()), "/triage status")
        elif sub == "models":
            await ack(response_type="ephemeral", text="Listing models…")
            later(self._respond(respond, self.models()), "/triage models")
        elif sub == "review":
            await ack(response_type="ephemeral", text="Looking for messages worth a look…")
            later(review.answer_command(self.review, respond), "/triage review")
        elif sub == "rollback":
            if len(args) != 1:
                await ack(response_type="ephemeral", text="Usage: `/triage rollback VERSION` (e.g. v3)")
                return
            await ack(response_type="ephemeral", text=f"Switching to {args[0]}…")
            later(self._respond(respond, self.rollback(user, args[0])), "/triage rollback")
        elif sub == "retrain":
            if self.retrainer is None:
                await ack(response_type="ephemeral", text="Retraining is not set up on this bot.")
                return
            if "--dry-run" in args:
                await ack(response_type="ephemeral", text="Looking at the feedback…")
                await self._audit(user, "retrain", args, allowed=True)
                later(self._respond(respond, self.retrainer.dry_run()), "/triage retrain")
                return
            # started (or found running) before the acknowledgement, which says which: never "Starting…"
            # and then "already running"
            channel = self._progress_channel(command.get("channel_id", ""))
            started, answer = await self.retrainer.start(requested_by=user, notify_channel=channel)
            await ack(response_type="ephemeral", text=answer)
            reason = None if started else "already running"
            await self._audit(user, "retrain", args, allowed=True, reason=reason)
        else:
            await ack(response_type="ephemeral", text=TRIAGE_USAGE)

    def _progress_channel(self, typed_in: str) -> str | None:
        """Where a run's progress goes: the channel the command was typed in, unless customers read it (a
        triaged channel): then the admins' summary channel."""
        if typed_in and not self.settings.watches(typed_in):
            return typed_in
        return self.settings.triage_summary_channel or self.settings.triage_escalation_channel

    async def _respond(self, respond: Any, work: Awaitable[str]) -> None:
        try:
            text = await work
        except Exception as exc:  # the user must hear back, whatever failed
            log.exception("/triage failed")
            text = f"That failed: {type(exc).__name__}. The details are in the bot's log."
        await respond(response_type="ephemeral", replace_original=True, text=text)

    async def _audit(
        self, user: str, action: str, args: list[str], allowed: bool, reason: str | None = None
    ) -> None:
        async with self.sessions.begin() as session:
            await repo.add_audit_entry(
                session, user_id=user, action=action, args={"args": args}, allowed=allowed, reason=reason
            )

    async def status(self) -> str:
        versions = await self.classifier.models()
        active = next((v for v in versions if v.status == ModelStatus.ACTIVE), None)
        lines = []
        since: datetime | None = None
        if active is None:
            lines.append("*Model:* none yet: train one with `triage train`")
        else:
            lines.append(f"*Model:* {active.name} (created {_when(active.created)})")
            for head, m in active.metrics.items():
                lines.append(
                    f"  • {head}: accuracy {m.get('accuracy', 0):.3f}, macro-F1 {m.get('macro_f1', 0):.3f}"
                )
            lines.extend(
                f"  :warning: {line}" for line in self.settings.missing_heads(schema_heads(active.schema))
            )
            if active.created:
                since = datetime.fromisoformat(active.created)
        async with self.sessions() as session:
            last = await repo.latest_training_run(session)
            if last is not None:
                since = last.started_at
            if since is not None:
                stats = await repo.stats_since(session, since)
                lines.append(
                    f"*Since {since:%Y-%m-%d %H:%M} UTC:* {stats.messages} messages, {stats.predictions} "
                    f"predictions, {stats.corrections} corrections, {stats.confirmations} confirmations; "
                    f"{stats.pending} waiting for the classifier"
                )
            lines.extend(_backlog_lines(await repo.backlog(session), await repo.count_skipped(session)))
        if last is None:
            lines.append("*Last retraining:* none yet")
        else:
            outcome = str(last.status)
            if last.candidate_version:
                outcome += f" ({last.candidate_version})"
            if last.error:
                outcome += f": {last.error[:200]}"
            lines.append(f"*Last retraining:* {outcome}, started {last.started_at:%Y-%m-%d %H:%M} UTC")
        return "\n".join(lines)

    async def models(self) -> str:
        versions = await self.classifier.models()
        if not versions:
            return "No model versions yet."
        lines = []
        for v in reversed(versions[-15:]):
            scores = ", ".join(f"{h} F1 {m.get('macro_f1', 0):.3f}" for h, m in v.metrics.items())
            scores = scores or "no held-out metrics"
            mark = ":white_check_mark: " if v.status == ModelStatus.ACTIVE else ""
            reason = (
                f" ({v.reason})"
                if v.reason and v.status in (ModelStatus.REJECTED, ModelStatus.RETIRED)
                else ""
            )
            lines.append(f"{mark}*{v.name}* {v.status}{reason}: {scores}")
        return "\n".join(lines)

    async def rollback(self, user: str, version: str) -> str:
        try:
            name = await self.classifier.activate(version)
        except ClassifierError as exc:
            await self._audit(user, "rollback", [version], allowed=True, reason=f"failed: {exc}")
            return f"Could not switch to {version}: {exc}"
        async with self.sessions.begin() as session:
            await repo.add_audit_entry(
                session, user_id=user, action="rollback", args={"version": name}, allowed=True
            )
        gaps = await self._missing_heads(name)
        done = f"{name} is now the active model. Every classifier picks it up within seconds."
        return "\n".join([done, *(f":warning: {line}" for line in gaps)])

    async def _missing_heads(self, name: str) -> list[str]:
        """What stops working because version ``name`` lacks heads the bot uses (nothing if unknown)."""
        try:
            info = next((v for v in await self.classifier.models() if v.name == name), None)
        except ClassifierError:
            return []
        return self.settings.missing_heads(schema_heads(info.schema)) if info else []


def _when(iso: str) -> str:
    """A registry timestamp as the bot's other figures show times (UTC, to the minute)."""
    try:
        return f"{datetime.fromisoformat(iso):%Y-%m-%d %H:%M} UTC"
    except ValueError:
        return iso


def refusal(command: str) -> str:
    """What a customer (or guest) who tries an agents' command is told."""
    return f"Sorry, `{command}` is for the support team of this workspace only."


def _backlog_lines(backlog: repo.Backlog, skipped: int) -> list[str]:
    """Messages not answered yet (retried until they are) and skipped ones someone may want back."""
    lines = []
    if backlog.waiting:
        oldest = f", the oldest since {backlog.oldest:%Y-%m-%d %H:%M} UTC" if backlog.oldest else ""
        lines.append(
            f"*Waiting:* {backlog.waiting} message(s) not answered yet, {backlog.failed} of them after "
            f"failures (retried until answered){oldest}"
        )
    if skipped:
        lines.append(
            f"*Skipped:* {skipped} message(s) with text were not answered; "
            "`triage messages retry` queues them again"
        )
    return lines

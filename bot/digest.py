"""The daily digest: one message in ``TRIAGE_DIGEST_CHANNEL`` (default: the card channel) on the
``TRIAGE_DIGEST_CRON`` schedule with yesterday's counts by topic and urgency, escalations, live accuracy per
head, the review queue's size and its top five (with their buttons), and the last retraining's result.

Replicas sharing the database each run the schedule; a row per schedule slot (``scheduled_posts``) lets
exactly one of them post.
"""

from __future__ import annotations

import logging
from datetime import datetime, time, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import blocks, review
from bot.home import accuracy_lines, run_line
from bot.settings import BotSettings
from bot.slack_output import SlackOutput
from bot.storage import repository as repo
from bot.storage.models import utcnow

log = logging.getLogger(__name__)

JOB = "digest"
ACCURACY_DAYS = 7
# A run this late is skipped (APScheduler's misfire): every replica's run then falls in the minute it was
# scheduled for, which is the slot the replicas agree on.
MISFIRE_GRACE_S = 30


def schedule_slot(now: datetime) -> datetime:
    """The schedule slot a run at ``now`` belongs to: cron fires on the minute."""
    return now.replace(second=0, microsecond=0)


def _counts_line(title: str, counts: dict[str, int]) -> str:
    shown = ", ".join(f"{label} {n}" for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"*{title}:* {shown or 'none'}"


class Digest:
    def __init__(
        self,
        settings: BotSettings,
        sessions: async_sessionmaker[AsyncSession],
        output: SlackOutput,
        queue: review.ReviewQueue,
    ):
        self.settings = settings
        self.sessions = sessions
        self.output = output
        self.queue = queue

    async def run_scheduled(self, now: datetime | None = None) -> bool:
        """The scheduler's job: post the digest unless another replica took this slot; whether we did."""
        channel = self.settings.digest_channel
        now = now or utcnow()
        if channel is None:
            return False
        slot = schedule_slot(now)
        async with self.sessions.begin() as session:
            claimed = await repo.claim_scheduled_post(session, JOB, slot)
        if not claimed:
            log.info("digest for %s: another replica posts it", slot.isoformat())
            return False
        text, shown = await self.message(now)
        return await self.output.post(channel, text, blocks=shown) is not None

    async def message(self, now: datetime) -> tuple[str, list[dict[str, object]]]:
        """The digest's fallback text and blocks, for the UTC day before ``now``."""
        until = datetime.combine(now.date(), time(0), tzinfo=now.tzinfo)
        since = until - timedelta(days=1)
        urgency = self.settings.triage_urgency_head
        async with self.sessions() as session:
            topics = await repo.count_labels_by(session, "topic", since=since, until=until)
            urgencies = await repo.count_labels_by(session, urgency, since=since, until=until)
            escalated = await repo.count_escalated(session, since=since, until=until)
            judged = await repo.live_accuracy(session, since=now - timedelta(days=ACCURACY_DAYS), until=now)
            last_run = await repo.latest_training_run(session)
        queue = await self.queue.current(now)
        total = sum(topics.values())
        messages = "1 message" if total == 1 else f"{total} messages"
        title = f"Triage digest for {since:%A %Y-%m-%d}: {messages}, {escalated} escalated"
        lines = [
            f"*{title}*",
            _counts_line("By topic", topics),
            _counts_line(f"By {blocks.head_title(urgency).lower()}", urgencies),
            "*Live accuracy* (messages people labelled)",
            *accuracy_lines({ACCURACY_DAYS: judged}),
            "*Last retraining:* " + (run_line(last_run).removeprefix("• ") if last_run else "none yet"),
        ]
        shown: list[dict[str, object]] = [
            {"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)[:3000]}},
            {"type": "divider"},
            *review.queue_blocks(queue),
        ]
        return title, shown


def add_digest(scheduler: AsyncIOScheduler, digest: Digest) -> None:
    """Schedule the digest on ``TRIAGE_DIGEST_CRON`` (nothing when it is empty or there is no channel)."""
    settings = digest.settings
    if not settings.triage_digest_cron or settings.digest_channel is None:
        return
    scheduler.add_job(
        digest.run_scheduled,
        CronTrigger.from_crontab(settings.triage_digest_cron, timezone="UTC"),
        id=JOB,
        max_instances=1,
        coalesce=True,
        misfire_grace_time=MISFIRE_GRACE_S,
    )

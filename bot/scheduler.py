"""Background schedule of the bot (APScheduler): retrain when enough feedback arrived, housekeeping."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.retrain import Retrainer, erase_removed_texts
from bot.settings import BotSettings
from bot.storage import repository as repo
from bot.storage.models import TrainingStatus, TrainingTrigger, utcnow
from classifier.paths import registry_dir
from classifier.registry import Registry, RegistryError

log = logging.getLogger(__name__)
EVENT_ID_TTL = timedelta(days=1)  # Slack retries within minutes; a day covers any replay


async def scheduled_retrain(
    settings: BotSettings, sessions: async_sessionmaker[AsyncSession], retrainer: Retrainer
) -> str:
    """Retrain only when at least N new labels arrived since the last finished run (or the active model)."""
    async with sessions() as session:
        last = await repo.latest_training_run(
            session, status=[TrainingStatus.PROMOTED, TrainingStatus.REJECTED]
        )
    if last is not None:
        since = last.started_at
    else:
        try:
            from datetime import datetime

            since = datetime.fromisoformat(Registry(registry_dir()).active().created)
        except RegistryError:
            return "no active model: nothing to retrain"
    async with sessions() as session:
        fresh = await repo.feedback_counts(session, since)
    if fresh.total < settings.triage_retrain_min_corrections:
        message = (
            f"{fresh.total} new labels since {since:%Y-%m-%d %H:%M}; "
            f"retraining waits for {settings.triage_retrain_min_corrections}"
        )
        log.info(message)
        return message
    channel = settings.triage_summary_channel or settings.triage_escalation_channel
    return await retrainer.request(
        requested_by=None, notify_channel=channel, trigger=TrainingTrigger.SCHEDULE
    )


async def housekeeping(
    settings: BotSettings, db_engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    now = utcnow()
    removed = 0
    async with sessions.begin() as session:
        await repo.delete_events_before(session, now - EVENT_ID_TTL)
        if settings.triage_retention_days:
            removed = await repo.purge_message_texts(
                session, older_than=repo.retention_cutoff(settings.triage_retention_days, now=now)
            )
    registry = Registry(registry_dir())
    if removed:
        # no VACUUM here: it would hold up the bot's writes; secure_delete already zeroed the old rows
        erased, _ = await erase_removed_texts(db_engine, sessions, registry, vacuum=False)
        log.info("retention: removed the text of %d messages (%d rows in model versions)", removed, erased)
    await asyncio.to_thread(registry.prune, settings.triage_keep_versions)


def build_scheduler(
    settings: BotSettings,
    db_engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    retrainer: Retrainer,
) -> AsyncIOScheduler:
    scheduler = AsyncIOScheduler(timezone="UTC")
    if settings.triage_retrain_cron:
        scheduler.add_job(
            scheduled_retrain,
            CronTrigger.from_crontab(settings.triage_retrain_cron, timezone="UTC"),
            args=[settings, sessions, retrainer],
            id="retrain",
            max_instances=1,
            coalesce=True,
        )
    scheduler.add_job(
        housekeeping,
        IntervalTrigger(hours=1),
        args=[settings, db_engine, sessions],
        id="housekeeping",
        max_instances=1,
        coalesce=True,
    )
    return scheduler

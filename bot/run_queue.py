"""Training runs as a queue in PostgreSQL, for `triage worker` (retraining where the GPU is).

The queue is the ``training_runs`` table itself: a run asked for while a worker is present is stored
'queued' with its options; a worker claims the oldest (``FOR UPDATE SKIP LOCKED``) under the run lock,
runs it, and writes each progress event as a ``training_run_events`` row; whoever asked (the bot, or
``triage retrain``) follows those rows and posts or prints them, exactly as it relays a child process's
JSON lines when no worker runs.

Liveness comes from PostgreSQL advisory locks, not heartbeats: a worker holds a shared lock on
``WORKER_LOCK_KEY`` while it is up (that is how the bot knows a worker exists), and a run holds the run
lock while it runs. A process killed with SIGKILL loses both the moment its connection drops, so a
'running' row while nobody holds the run lock is a dead run: the follower fails it and says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.retrain import (
    RunBusy,
    RunOptions,
    advisory_lock_held,
    fail_dead_runs,
    run_in_progress,
    run_lock,
)
from bot.storage import repository as repo
from bot.storage.models import TrainingStatus, TrainingTrigger, utcnow

WORKER_LOCK_KEY = 0x7472_6961_6777  # held shared by every running `triage worker`
# a run recorded as finished whose 'done' event never came (an older version, a crash between the two
# writes) is summed up from its row after this long
DONE_EVENT_GRACE = timedelta(seconds=30)


async def worker_present(db_engine: AsyncEngine) -> bool:
    """Whether a `triage worker` is up on this database (always ``False`` on SQLite: no worker runs there)."""
    return db_engine.dialect.name == "postgresql" and await advisory_lock_held(db_engine, WORKER_LOCK_KEY)


async def enqueue(
    sessions: async_sessionmaker[AsyncSession],
    *,
    trigger: TrainingTrigger,
    options: RunOptions,
    requested_by: str | None = None,
    notify_channel: str | None = None,
) -> int:
    """Store a queued run for a worker; its id."""
    async with sessions.begin() as session:
        run = await repo.enqueue_training_run(
            session,
            trigger=trigger,
            options=options.to_json(),
            requested_by=requested_by,
            notify_channel=notify_channel,
        )
        return run.id


async def fail_if_dead(sessions: async_sessionmaker[AsyncSession], db_engine: AsyncEngine) -> int:
    """Fail every 'running' run whose process died: only while nobody holds the run lock, taken here for a
    moment so that no run can start in between. How many were failed."""
    if await run_in_progress(db_engine):
        return 0
    try:
        async with run_lock(db_engine), sessions.begin() as session:
            return await fail_dead_runs(session, utcnow())
    except RunBusy:
        return 0  # a run started just now: it is alive


async def follow_run(
    sessions: async_sessionmaker[AsyncSession], db_engine: AsyncEngine, run_id: int, *, poll_s: float = 1.0
) -> AsyncIterator[dict[str, Any]]:
    """A queued or running run's progress events as they are written, ending with its ``done`` event.

    A run whose worker was killed ends too: the follower fails it (``fail_if_dead``), which writes the
    ``done`` event. A queued run waits for as long as no worker claims it.
    """
    after = 0
    while True:
        async with sessions() as session:
            run = await repo.get_training_run(session, run_id)
            rows = await repo.training_run_events(session, run_id, after=after)
        if run is None:
            yield _done(TrainingStatus.FAILED, f":x: Retraining run {run_id} is gone from the database.")
            return
        for row in rows:
            after = row.id
            yield row.event
            if row.event.get("event") == "done":
                return
        if run.status == TrainingStatus.RUNNING:
            if await fail_if_dead(sessions, db_engine):
                continue  # its 'done' event is written: read it at once
        elif (
            run.status != TrainingStatus.QUEUED
            and utcnow() - (run.finished_at or utcnow()) > DONE_EVENT_GRACE
        ):
            yield _done(run.status, f"Retraining run {run_id} ended: {run.status}. {run.error or ''}".strip())
            return
        await asyncio.sleep(poll_s)


def _done(status: TrainingStatus, summary: str) -> dict[str, Any]:
    return {"event": "done", "status": str(status), "summary": summary, "confusion_png": None}

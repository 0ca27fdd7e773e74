"""`triage worker`: claims queued training runs from PostgreSQL and runs them on this machine's device.

Run it where the GPU is (docker/compose.yaml runs it in the CUDA image beside the classifier). It needs
only ``DATABASE_URL`` and the model registry (``TRIAGE_DATA_DIR``, shared with the classifier and the
bot): no Slack token, no classifier token. While it is up, the bot, the scheduler and ``triage retrain``
queue their runs for it instead of training themselves (see ``bot.run_queue``).

One run at a time, across workers and the bot alike: a run holds the run lock (``bot.retrain.run_lock``).
SIGTERM stops claiming; a run in progress finishes first (a SIGKILL fails it, and the model stays).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.retrain import (
    EXIT_FAILED,
    ProgressSink,
    RunBusy,
    RunOptions,
    RunOutcome,
    execute_run,
    fail_dead_runs,
    run_lock,
)
from bot.run_queue import WORKER_LOCK_KEY
from bot.settings import WorkerSettings
from bot.storage import repository as repo
from bot.storage.database import check_schema, create_db_engine, create_session_factory
from bot.storage.models import TrainingStatus, utcnow
from classifier.paths import registry_dir
from classifier.registry import Registry

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def presence(db_engine: AsyncEngine) -> AsyncIterator[None]:
    """Hold the shared worker lock on a connection of its own for as long as the worker is up."""
    async with db_engine.connect() as conn:
        await conn.execute(text("SELECT pg_advisory_lock_shared(:k)"), {"k": WORKER_LOCK_KEY})
        await conn.commit()
        try:
            yield
        finally:
            await conn.execute(text("SELECT pg_advisory_unlock_shared(:k)"), {"k": WORKER_LOCK_KEY})
            await conn.commit()


@contextlib.asynccontextmanager
async def progress_rows(
    sessions: async_sessionmaker[AsyncSession], run_id: int
) -> AsyncIterator[ProgressSink]:
    """A progress sink that stores each event as a row, in order. Events come from the training thread
    and from the event loop alike; one writer task on the loop writes them."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def write() -> None:
        while (event := await queue.get()) is not None:
            async with sessions.begin() as session:
                await repo.add_training_run_event(session, run_id, event)

    def emit(event: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, json.loads(json.dumps(event, default=str)))

    writer = asyncio.ensure_future(write())
    try:
        yield emit
    finally:
        loop.call_soon_threadsafe(queue.put_nowait, None)
        await writer


async def run_next(
    sessions: async_sessionmaker[AsyncSession], db_engine: AsyncEngine, registry: Registry, worker: str
) -> RunOutcome | None:
    """Claim the oldest queued run and run it; ``None`` when none waits or another run holds the lock."""
    async with sessions() as session:
        if await repo.latest_training_run(session, status=TrainingStatus.QUEUED) is None:
            return None  # the run lock is not taken for nothing: a busy check would see a run that is not
    try:
        async with run_lock(db_engine):
            async with sessions.begin() as session:
                await fail_dead_runs(session, utcnow())
                run = await repo.claim_training_run(session, worker=worker)
            if run is None:
                return None
            log.info(
                "claimed training run %s (%s, asked by %s)", run.id, run.trigger, run.requested_by or "-"
            )
            async with progress_rows(sessions, run.id) as emit:
                try:
                    options = RunOptions.from_json(run.options)
                except ValueError as exc:
                    return await _refuse(sessions, run.id, str(exc), emit)
                return await execute_run(
                    sessions,
                    registry,
                    run.id,
                    run.started_at,
                    gate=options.gate,
                    epochs=options.epochs,
                    emit=emit,
                    acceptance=options.acceptance,
                )
    except RunBusy:
        return None


async def _refuse(
    sessions: async_sessionmaker[AsyncSession], run_id: int, error: str, emit: ProgressSink
) -> RunOutcome:
    outcome = RunOutcome(status=TrainingStatus.FAILED, error=error)
    async with sessions.begin() as session:
        await repo.finish_training_run(session, run_id, status=outcome.status, error=error)
    emit(
        {"event": "done", "status": str(outcome.status), "summary": outcome.summary(), "confusion_png": None}
    )
    return outcome


def worker_name(settings: WorkerSettings) -> str:
    """``host:pid (device)``: recorded on each run it claims."""
    from classifier.model import resolve_device

    name = settings.triage_worker_name or f"{socket.gethostname()}:{os.getpid()}"
    return f"{name} ({resolve_device('auto').type})"


async def serve(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Claim and run queued runs until ``stop`` is set (a run in progress finishes first)."""
    db_engine = create_db_engine(settings.database_url)
    try:
        await check_schema(db_engine)
        sessions = create_session_factory(db_engine)
        registry = Registry(registry_dir())
        name = worker_name(settings)
        async with presence(db_engine):
            log.info("triage worker %s: waiting for training runs", name)
            while not stop.is_set():
                outcome = await run_next(sessions, db_engine, registry, name)
                if outcome is not None:
                    log.info("training run finished: %s", outcome.summary().splitlines()[0])
                    continue  # another may be waiting
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), settings.triage_worker_poll_s)
    finally:
        await db_engine.dispose()


async def run_worker(settings: WorkerSettings) -> None:
    """``serve`` until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)


def main() -> int:
    from bot.settings import worker_settings_or_exit
    from bot.storage.database import SchemaMismatchError

    settings = worker_settings_or_exit()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run_worker(settings))
    except SchemaMismatchError as exc:  # as every command says it (README, "Command line")
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())

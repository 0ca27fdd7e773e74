"""The feedback loop: corrections in the database → candidate model → judged against the incumbent → gate.

One run, as plain steps that each leave a record (``TrainingRun`` row, registry version, run log):

1. dataset: the active version's base data plus the latest human labels from the database, cut off at
   the run's start;
2. held-out: the test share of the active version's stratified, hash-ranked split of that data (the base
   test split plus the same share of corrected messages; human labels only), never trained on in the run;
3. train a candidate warm-started from the active version;
4. evaluate candidate and incumbent on the same held-out rows; the ``Gate`` decides;
5. promote (registry ACTIVE; every engine hot-swaps) or keep it as rejected.

Steps 3 to 5's model side (train, judge, decide) is ``classifier.promotion``; this module keeps what
needs the database or Slack: the examples, the run's record and lock, and relaying its progress (the
texts are in ``bot.blocks``).

A run executes in its own process (``python -m bot.retrain``), never on the bot's event loop; one run at a
time across all replicas, by a PostgreSQL advisory lock or, on SQLite, a file lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from filelock import FileLock, Timeout
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from bot.blocks import retrain_busy_text, retrain_progress_text, retrain_summary_text
from bot.storage import repository as repo
from bot.storage.database import check_schema, create_db_engine, create_session_factory, erase_freed_space
from bot.storage.models import TrainingStatus, TrainingTrigger, utcnow
from classifier.data import (
    Example,
    Split,
    label_counts,
    normalize,
    read_jsonl,
)
from classifier.paths import data_dir, registry_dir
from classifier.promotion import Gate, ProgressSink, train_and_judge
from classifier.registry import Registry, VersionInfo

log = logging.getLogger(__name__)

ADVISORY_LOCK_KEY = 0x7472_6961_6765  # "triage": one key for the whole product
FEEDBACK_SOURCE = "slack:"  # every row from the database; re-read fresh by each run
ACCEPTED_SOURCE = f"{FEEDBACK_SOURCE}accepted:"  # a prediction people let stand (training only)


@dataclass
class Acceptance:
    """Which predictions count as accepted labels: people correct what is wrong, so a prediction left
    uncorrected for ``after_hours`` stands. Without these rows a run sees only the model's mistakes: the
    corrections pull every confusable class towards the labels people typed, and classes the model got
    right lose recall (measured: bench/feedback_loop.py). ``max_rows`` newest messages; 0 turns it off."""

    after_hours: float = 24.0
    max_rows: int = 20_000


@dataclass
class RunOptions:
    """What a run is asked to do, built from the settings by whoever asks (``RetrainSettings``); it travels
    with the run to the child process or the worker as JSON."""

    gate: Gate = field(default_factory=Gate)
    acceptance: Acceptance = field(default_factory=Acceptance)
    epochs: int | None = None  # default: the active model's own setting

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> RunOptions:
        """Validated: a row another version (or a person) wrote may not have the shape this one expects."""
        try:
            return TypeAdapter(cls).validate_python(data or {})
        except ValidationError as exc:
            raise ValueError(f"the run's options are not valid: {exc.error_count()} problem(s)") from None


@dataclass
class RunOutcome:
    status: TrainingStatus
    candidate: str | None = None
    incumbent: str | None = None
    reasons: list[str] = field(default_factory=list)
    deltas: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    confusion_png: str | None = None

    def summary(self) -> str:
        return retrain_summary_text(self)


class RunBusy(RuntimeError):
    """Another retraining run holds the lock."""


def _run_file_lock() -> FileLock:
    return FileLock(str(data_dir() / "retrain.lock"), timeout=0)


async def advisory_lock_held(db_engine: AsyncEngine, key: int) -> bool:
    """Whether any session of this PostgreSQL database holds the advisory lock ``key`` (read from
    ``pg_locks``; takes nothing). A killed process's locks are gone the moment its connection drops."""
    held = text(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND classid = :high AND objid = :low AND objsubid = 1)"
    )
    async with db_engine.connect() as conn:
        return bool((await conn.execute(held, {"high": key >> 32, "low": key & 0xFFFF_FFFF})).scalar())


async def run_in_progress(db_engine: AsyncEngine) -> bool:
    """Whether a run holds the lock now: the only sign of a live run (a 'running' row may be a dead one's).

    On PostgreSQL it reads ``pg_locks`` and takes nothing; on SQLite it takes the file lock and lets go at
    once, so a run starting in that instant may find it busy (it then says so, and nothing is lost).
    """
    if db_engine.dialect.name == "postgresql":
        return await advisory_lock_held(db_engine, ADVISORY_LOCK_KEY)
    lock = _run_file_lock()
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


@contextlib.asynccontextmanager
async def run_lock(db_engine: AsyncEngine) -> AsyncIterator[None]:
    """Exclusive across processes and replicas: PostgreSQL advisory lock, or a file lock beside SQLite."""
    if db_engine.dialect.name == "postgresql":
        conn: AsyncConnection
        async with db_engine.connect() as conn:
            got = (
                await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
            ).scalar()
            await conn.commit()
            if not got:
                raise RunBusy("a retraining run is in progress")
            try:
                yield
            finally:
                await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
                await conn.commit()
    else:
        lock = _run_file_lock()
        try:
            lock.acquire()
        except Timeout:
            raise RunBusy("a retraining run is in progress") from None
        try:
            yield
        finally:
            lock.release()


def merge_feedback(
    base: list[Example],
    feedback: list[repo.TrainingExample],
    accepted: Sequence[repo.TrainingExample] = (),
) -> list[Example]:
    """Base rows plus human labels; a human label for the same text wins over the base one. Accepted
    predictions add texts the base data lacks, under the human labels of the same message; their labels
    are training-only (``Example.train_only``), so the split never holds them out to judge a model on."""
    by_text: dict[str, Example] = {}
    for ex in base:
        if not ex.source.startswith(FEEDBACK_SOURCE):  # earlier runs' feedback is re-read fresh below
            by_text.setdefault(normalize(ex.text), Example(ex.text, dict(ex.labels), ex.source))
    for row in accepted:
        key = normalize(row.text)
        if key not in by_text:  # curated base rows stay as they were given
            by_text[key] = Example(
                row.text, dict(row.labels), f"{ACCEPTED_SOURCE}{row.message_id}", train_only=tuple(row.labels)
            )
    for fb in feedback:
        key = normalize(fb.text)
        if key in by_text:
            ex = by_text[key]
            ex.labels.update(fb.labels)
            ex.source = f"{FEEDBACK_SOURCE}{fb.message_id}"
            ex.train_only = tuple(h for h in ex.train_only if h not in fb.labels)
        else:
            by_text[key] = Example(fb.text, dict(fb.labels), f"{FEEDBACK_SOURCE}{fb.message_id}")
    return list(by_text.values())


def feedback_message_id(source: str) -> int | None:
    """The message a feedback row came from (``slack:12``, ``slack:accepted:12``)."""
    tail = source.rpartition(":")[2]
    return int(tail) if tail.isdigit() else None


async def erase_from_versions(sessions: async_sessionmaker[AsyncSession], registry: Registry) -> int:
    """Erase from every model version the Slack rows whose text the database no longer holds (forgotten,
    purged by retention, deleted): versions keep copies of the rows they were trained and judged on.
    Runs never need these copies: each run re-reads Slack rows from the database. Returns rows erased."""
    sources = await asyncio.to_thread(registry.row_sources)
    referenced = {s: feedback_message_id(s) for s in sources if s.startswith(FEEDBACK_SOURCE)}
    async with sessions() as session:
        kept = await repo.message_ids_with_text(session, {i for i in referenced.values() if i is not None})
    gone = [source for source, message_id in referenced.items() if message_id not in kept]
    return sum((await asyncio.to_thread(registry.erase_rows, gone)).values())


async def erase_removed_texts(
    db_engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], registry: Registry, *, vacuum: bool
) -> tuple[int, bool]:
    """After texts were removed from the database, remove every other copy under the data directory and
    in the database files. Returns (rows erased from model versions, whether the database files are
    clean: ``False`` if a reader kept SQLite's WAL from being emptied)."""
    erased = await erase_from_versions(sessions, registry)
    with contextlib.suppress(RunBusy):  # a live run removes its own staging folder, and erases after commit
        async with run_lock(db_engine):
            await asyncio.to_thread(registry.clean_staging)
    return erased, await erase_freed_space(db_engine, vacuum=vacuum)


def split_for_run(active: VersionInfo, examples: Sequence[Example]) -> dict[Split, list[Example]]:
    """A run's rows split as ``train()`` splits them for a candidate warm-started from ``active``: the test
    share is what both models are judged on (``classifier.promotion.heldout_rows``)."""
    return active.split(examples)


def _is_human_feedback(example: Example) -> bool:
    return example.source.startswith(FEEDBACK_SOURCE) and not example.source.startswith(ACCEPTED_SOURCE)


def _restrict_to_schema(examples: list[Example], heads: dict[str, list[str]]) -> list[Example]:
    """Drop labels the active model cannot learn (a head or label it does not have)."""
    out = []
    for ex in examples:
        labels = {h: v for h, v in ex.labels.items() if h in heads and v in heads[h]}
        if labels:
            out.append(Example(ex.text, labels, ex.source, tuple(h for h in ex.train_only if h in labels)))
    return out


async def dataset_for_run(
    sessions: async_sessionmaker[AsyncSession],
    registry: Registry,
    until: datetime,
    acceptance: Acceptance | None = None,
) -> tuple[VersionInfo, list[Example], list[repo.TrainingExample]]:
    acceptance = acceptance or Acceptance()
    active = registry.active()
    heads = active.schema["heads"]
    base = read_jsonl(active.files.dataset)
    async with sessions() as session:
        feedback = await repo.export_training_set(session, until=until, heads=list(heads))
        accepted = await repo.export_accepted_predictions(
            session,
            until=until,
            predicted_before=until - timedelta(hours=acceptance.after_hours),
            heads=list(heads),
            limit=acceptance.max_rows,
        )
    return active, _restrict_to_schema(merge_feedback(base, feedback, accepted), heads), feedback


async def describe_dry_run(
    sessions: async_sessionmaker[AsyncSession], registry: Registry, acceptance: Acceptance | None = None
) -> str:
    """What a run would train on, without training."""
    active, examples, feedback = await dataset_for_run(sessions, registry, utcnow(), acceptance)
    async with sessions() as session:
        last = await repo.latest_training_run(
            session, status=[TrainingStatus.PROMOTED, TrainingStatus.REJECTED]
        )
        since = last.started_at if last else datetime.fromisoformat(active.created)
        fresh = await repo.feedback_counts(session, since)
    fb_examples = [e for e in examples if _is_human_feedback(e)]
    accepted = sum(e.source.startswith(ACCEPTED_SOURCE) for e in examples)
    held_out = sum(_is_human_feedback(e) for e in split_for_run(active, examples)["test"])
    lines = [
        f"*Dry run* (active model {active.name}): {len(examples)} training rows, {len(fb_examples)} with "
        f"labels from Slack ({held_out} of them held out for judging), {accepted} with "
        "predictions nobody corrected (training only).",
        f"New since the last run: {fresh.corrections} corrections, {fresh.confirmations} confirmations.",
    ]
    for head, counts in label_counts(fb_examples).items():
        top = ", ".join(f"{label} {n}" for label, n in counts.most_common(8))
        lines.append(f"  • {head} (from Slack): {top}")
    changed = Counter(h for fb in feedback for h in fb.labels)
    if changed:
        lines.append("Labels per head from Slack: " + ", ".join(f"{h} {n}" for h, n in changed.items()))
    return "\n".join(lines)


async def run_once(
    sessions: async_sessionmaker[AsyncSession],
    db_engine: AsyncEngine,
    registry: Registry,
    *,
    trigger: TrainingTrigger,
    requested_by: str | None = None,
    gate: Gate | None = None,
    epochs: int | None = None,
    on_progress: ProgressSink | None = None,
    acceptance: Acceptance | None = None,
) -> RunOutcome:
    """One complete run under the lock; raises ``RunBusy`` if another run holds it."""
    async with run_lock(db_engine):
        started = utcnow()
        async with sessions.begin() as session:
            await fail_dead_runs(session, started)
            run = await repo.start_training_run(
                session, trigger=trigger, requested_by=requested_by, now=started
            )
        return await execute_run(
            sessions,
            registry,
            run.id,
            started,
            gate=gate,
            epochs=epochs,
            emit=on_progress,
            acceptance=acceptance,
        )


ABANDONED = "abandoned: its process stopped before the run finished; the active model is unchanged"


async def fail_dead_runs(session: AsyncSession, now: datetime) -> int:
    """Under the run lock: a run still 'running' is a killed process's (a live one would hold the lock).
    Each is failed, with a last progress event for whoever follows it (the bot, for a worker's run)."""
    done = {"event": "done", "status": str(TrainingStatus.FAILED), "confusion_png": None}
    summary = RunOutcome(status=TrainingStatus.FAILED, error=ABANDONED).summary()
    return await repo.fail_abandoned_training_runs(
        session, started_before=now, now=now, error=ABANDONED, event={**done, "summary": summary}
    )


async def execute_run(
    sessions: async_sessionmaker[AsyncSession],
    registry: Registry,
    run_id: int,
    started: datetime,
    *,
    gate: Gate | None = None,
    epochs: int | None = None,
    emit: ProgressSink | None = None,
    acceptance: Acceptance | None = None,
) -> RunOutcome:
    """The steps of a run whose 'running' record exists, by a caller that holds the run lock: dataset (cut
    off at ``started``), train and judge, record the outcome, and a last ``done`` event."""
    gate = gate or Gate()
    emit = emit or (lambda _: None)
    registry.clean_staging()
    try:
        active, examples, _ = await dataset_for_run(sessions, registry, started, acceptance)
        outcome = await asyncio.to_thread(
            _train_and_judge_sync, registry, active, examples, gate, epochs, emit
        )
    except Exception as exc:  # recorded, never fatal to the caller
        log.exception("retraining run %s failed", run_id)
        outcome = RunOutcome(status=TrainingStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
    # a person forgotten (or texts purged) while the run trained: the new version copied their rows
    try:
        await erase_from_versions(sessions, registry)
    except Exception:  # the run's record comes first; `triage data purge` erases them later
        log.exception("retraining run %s could not erase removed texts from the model versions", run_id)
    async with sessions.begin() as session:
        await repo.finish_training_run(
            session,
            run_id,
            status=outcome.status,
            train_examples=outcome.counts.get("train"),
            eval_examples=outcome.counts.get("heldout"),
            candidate_metrics={
                h: {"macro_f1": d["candidate"], "accuracy": d["candidate_accuracy"]}
                for h, d in outcome.deltas.items()
            }
            or None,
            incumbent_metrics={
                h: {"macro_f1": d["incumbent"], "accuracy": d["incumbent_accuracy"]}
                for h, d in outcome.deltas.items()
            }
            or None,
            candidate_version=outcome.candidate,
            error=outcome.error or ("; ".join(outcome.reasons) or None),
        )
    emit(
        {
            "event": "done",
            "status": str(outcome.status),
            "summary": outcome.summary(),
            "confusion_png": outcome.confusion_png,
        }
    )
    return outcome


def _train_and_judge_sync(
    registry: Registry,
    active: VersionInfo,
    examples: list[Example],
    gate: Gate,
    epochs: int | None,
    emit: ProgressSink,
) -> RunOutcome:
    """The heavy part (``classifier.promotion``), with what the run says about its rows. Runs in a worker
    thread of the run's process."""
    counts = _row_counts(split_for_run(active, examples))
    emit({"event": "dataset", **counts, "incumbent": active.name})
    judgement = train_and_judge(registry, active, examples, gate, epochs=epochs, emit=emit)
    return RunOutcome(
        status=TrainingStatus.PROMOTED if judgement.promoted else TrainingStatus.REJECTED,
        candidate=judgement.candidate,
        incumbent=judgement.incumbent,
        reasons=judgement.reasons,
        deltas=judgement.deltas,
        counts=counts,
        confusion_png=judgement.confusion_png,
    )


def _row_counts(splits: dict[Split, list[Example]]) -> dict[str, int]:
    """How many rows a run learns from and is judged on, and how many of each came from Slack."""
    heldout = splits["test"]
    learn = splits["train"] + splits["validation"]
    return {
        "train": len(learn),
        "feedback": sum(_is_human_feedback(e) for e in learn),
        "accepted": sum(e.source.startswith(ACCEPTED_SOURCE) for e in learn),
        "heldout": len(heldout),
        "heldout_feedback": sum(e.source.startswith(FEEDBACK_SOURCE) for e in heldout),
    }


# ---- starting a run: in a child process of the bot, in `triage retrain`, or queued for a worker ---------
EXIT_FAILED = 1  # the run ran and failed (the active model is unchanged)
EXIT_BUSY = 3  # another run holds the lock or waits for the worker


@dataclass
class RunRequest:
    """A run someone asked for: ``triage retrain`` starts it in its own process, the bot in a child process
    (``python -m bot.retrain``) that gets it as one JSON object on its stdin: typed on both sides, and the
    database URL (it may hold a password) never in argv."""

    options: RunOptions
    trigger: TrainingTrigger = TrainingTrigger.COMMAND
    requested_by: str | None = None
    database_url: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RunRequest:
        return TypeAdapter(cls).validate_json(data)


async def start_child(run: RunRequest) -> asyncio.subprocess.Process:
    """``python -m bot.retrain`` for ``run``: progress as JSON lines on its stdout (see ``child_main``)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.retrain",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None
    process.stdin.write(run.to_json())
    await process.stdin.drain()
    process.stdin.close()
    return process


async def start_run(run: RunRequest, emit: ProgressSink, *, slack: bool) -> int:
    """One run here (or queued for a worker, if one is up, and followed): its progress to ``emit``, and an
    exit status: 0, ``EXIT_FAILED`` or ``EXIT_BUSY`` (after a ``busy`` event; ``slack``: mention who)."""
    from bot.run_queue import worker_present  # bot.run_queue builds on this module

    db_engine = create_db_engine(run.database_url)
    sessions = create_session_factory(db_engine)
    try:
        await check_schema(db_engine)
        if await worker_present(db_engine):
            status = await _run_on_worker(sessions, db_engine, run, emit)
        else:
            outcome = await run_once(
                sessions,
                db_engine,
                Registry(registry_dir()),
                trigger=run.trigger,
                requested_by=run.requested_by,
                epochs=run.options.epochs,
                on_progress=emit,
                gate=run.options.gate,
                acceptance=run.options.acceptance,
            )
            status = outcome.status
        return EXIT_FAILED if status == TrainingStatus.FAILED else 0
    except RunBusy:
        async with sessions() as session:
            running = await repo.latest_training_run(session, status=TrainingStatus.RUNNING)
            running = running or await repo.latest_training_run(session, status=TrainingStatus.QUEUED)
        emit({"event": "busy", "message": retrain_busy_text(running, slack=slack)})
        return EXIT_BUSY
    finally:
        await db_engine.dispose()


async def _run_on_worker(
    sessions: async_sessionmaker[AsyncSession], db_engine: AsyncEngine, run: RunRequest, emit: ProgressSink
) -> TrainingStatus:
    """Queue the run for the `triage worker` and pass its progress rows to ``emit`` until it ends; raises
    ``RunBusy`` while another run runs or waits (as a run here would)."""
    from bot.run_queue import enqueue, follow_run

    async with sessions() as session:
        waiting = await repo.latest_training_run(session, status=TrainingStatus.QUEUED)
    if waiting is not None or await run_in_progress(db_engine):
        raise RunBusy("a retraining run is in progress or queued")
    run_id = await enqueue(sessions, trigger=run.trigger, options=run.options, requested_by=run.requested_by)
    emit({"event": "queued", "run_id": run_id})
    status = TrainingStatus.FAILED
    async for event in follow_run(sessions, db_engine, run_id):
        emit(event)
        if event.get("event") == "done":
            status = TrainingStatus(event.get("status", TrainingStatus.FAILED))
    return status


async def dry_run_text(options: RunOptions, database_url: str | None) -> str:
    """`triage retrain --dry-run`: what a run would train on."""
    db_engine = create_db_engine(database_url)
    try:
        await check_schema(db_engine)
        return await describe_dry_run(
            create_session_factory(db_engine), Registry(registry_dir()), options.acceptance
        )
    finally:
        await db_engine.dispose()


def print_progress(event: dict[str, Any]) -> None:
    """`triage retrain`'s progress, for people: epochs and the summary on stdout, the rest on stderr."""
    kind = event.get("event")
    if kind == "epoch":
        print(
            f"epoch {event['epoch']}/{event['epochs']}: validation macro-F1 {event['val_macro_f1']:.4f}",
            flush=True,
        )
    elif kind == "done":
        print(event["summary"], flush=True)
    elif kind == "queued":
        print(f"Queued as run {event['run_id']} for the worker; waiting for it.", file=sys.stderr, flush=True)
    elif kind == "busy":
        print(event["message"], file=sys.stderr, flush=True)


def _print_json(event: dict[str, Any]) -> None:
    print(json.dumps(event, default=str), flush=True)


def child_main() -> int:
    """``python -m bot.retrain``: the run a ``RunRequest`` on stdin describes, progress as JSON lines."""
    logging.basicConfig(level=logging.WARNING)
    try:
        run = RunRequest.from_json(sys.stdin.buffer.read())
    except ValidationError as exc:
        print(f"error: the run on stdin is not valid: {exc.error_count()} problem(s)", file=sys.stderr)
        return 2
    return asyncio.run(start_run(run, _print_json, slack=True))  # the bot relays it to Slack


# ---- the bot's side: start a run in a separate process and relay its progress ---------------------------
class Retrainer:
    """Starts runs as child processes (``python -m bot.retrain``) and relays their progress to Slack."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        db_engine: AsyncEngine,
        post: Callable[[str, str, str | None], Awaitable[str | None]],
        upload: Callable[[str, str, str], Awaitable[None]] | None = None,
        summary_channel: str | None = None,
        options: RunOptions | None = None,
        poll_s: float = 1.0,
    ):
        self.sessions = sessions
        self.options = options or RunOptions()
        self.db_engine = db_engine
        self.post = post  # (channel, text, thread_ts) -> ts of the posted message
        self.upload = upload  # (channel, path, title)
        self.summary_channel = summary_channel
        self.process: asyncio.subprocess.Process | None = None
        self.relay: asyncio.Future[None] | None = None  # relays the running run's progress
        self.poll_s = poll_s  # how often a queued run's progress rows are read
        self.starting = asyncio.Lock()  # one start at a time here: a second ask then finds the first's run

    async def dry_run(self) -> str:
        return await describe_dry_run(self.sessions, Registry(registry_dir()), self.options.acceptance)

    async def busy_message(self) -> str | None:
        """What to answer while a run holds the lock (or this bot's is starting, or one waits for the
        worker); ``None`` when free."""
        if self.process is not None and self.process.returncode is None:
            return "Retraining is already running (started from this bot)."
        if await run_in_progress(self.db_engine):
            async with self.sessions() as session:
                return retrain_busy_text(
                    await repo.latest_training_run(session, status=TrainingStatus.RUNNING)
                )
        # a 'running' row now is a killed run's: the next run marks it failed
        from bot.run_queue import worker_present  # bot.run_queue builds on this module

        if await worker_present(self.db_engine):
            async with self.sessions() as session:
                queued = await repo.latest_training_run(session, status=TrainingStatus.QUEUED)
            if queued is not None:
                return retrain_busy_text(queued)
        return None

    async def request(
        self,
        requested_by: str | None,
        notify_channel: str | None,
        trigger: TrainingTrigger = TrainingTrigger.COMMAND,
    ) -> str:
        """Start a run unless one is going; returns what to tell the person who asked (see ``start``)."""
        _, answer = await self.start(requested_by, notify_channel, trigger)
        return answer

    async def start(
        self,
        requested_by: str | None,
        notify_channel: str | None,
        trigger: TrainingTrigger = TrainingTrigger.COMMAND,
    ) -> tuple[bool, str]:
        """Start a run unless one is going: whether it started, and what to tell the person who asked.

        With a `triage worker` up, the run is queued for it and its progress rows are relayed; otherwise
        it runs in a child process of the bot. Starts in this bot take turns, so a second ask finds the
        first's run. Across replicas the check is a courtesy: the run itself takes the lock, and reports
        back if another got it first.
        """
        from bot.run_queue import worker_present

        async with self.starting:
            busy = await self.busy_message()
            if busy:
                return False, busy
            if await worker_present(self.db_engine):
                return True, await self._enqueue(requested_by, notify_channel, trigger)
            database_url = self.db_engine.url.render_as_string(hide_password=False)
            self.process = await start_child(RunRequest(self.options, trigger, requested_by, database_url))
            self.relay = asyncio.ensure_future(self._relay(self.process, notify_channel))
            return True, f"Retraining started; {self._follows(notify_channel)}"

    async def _enqueue(self, requested_by: str | None, channel: str | None, trigger: TrainingTrigger) -> str:
        from bot.run_queue import enqueue, follow_run

        run_id = await enqueue(
            self.sessions,
            trigger=trigger,
            options=self.options,
            requested_by=requested_by,
            notify_channel=channel,
        )
        events = follow_run(self.sessions, self.db_engine, run_id, poll_s=self.poll_s)
        self.relay = asyncio.ensure_future(self._relay_queued(events, channel))
        return f"Retraining queued for the worker; {self._follows(channel)}"

    def _follows(self, channel: str | None) -> str:
        """Where the run's progress and summary go, named (the answer is also shown on App Home)."""
        where = channel or self.summary_channel
        return f"progress follows in <#{where}>." if where else "its result is in the bot's log."

    async def _relay_queued(self, events: AsyncIterator[dict[str, Any]], channel: str | None) -> None:
        final, _ = await self._post_progress(events, channel)
        if final is not None:
            await self._post_summary(final, channel)

    async def _relay(self, process: asyncio.subprocess.Process, channel: str | None) -> None:
        started = time.monotonic()
        assert process.stdout is not None and process.stderr is not None
        stderr_task = asyncio.ensure_future(process.stderr.read())
        final, thread = await self._post_progress(_json_lines(process.stdout), channel)
        await process.wait()
        stderr = (await stderr_task).decode(errors="replace")
        if final is not None:
            await self._post_summary(final, channel)
            return
        if process.returncode and stderr.strip():
            log.error("retrain process exited %s: %s", process.returncode, stderr[-2000:])
        if process.returncode not in (0, None) and channel:
            await self.post(
                channel,
                f":x: Retraining process exited with code {process.returncode} after "
                f"{time.monotonic() - started:.0f} s; see the bot's log.",
                thread,
            )

    async def _post_progress(
        self, events: AsyncIterator[dict[str, Any]], channel: str | None
    ) -> tuple[dict[str, Any] | None, str | None]:
        """Post each progress event in one thread of ``channel``; the ``done`` event (if one came) and the
        thread's ts."""
        thread: str | None = None
        async for event in events:
            if event.get("event") == "done":
                return event, thread
            text = retrain_progress_text(event)
            if text and channel:
                ts = await self.post(channel, text, thread)
                thread = thread or ts
        return None, thread

    async def _post_summary(self, final: dict[str, Any], channel: str | None) -> None:
        for target in [c for c in dict.fromkeys([channel, self.summary_channel]) if c]:
            await self.post(target, final["summary"], None)
            if self.upload and final.get("confusion_png"):
                await self.upload(
                    target, final["confusion_png"], "Held-out confusion matrix of the candidate"
                )


async def _json_lines(stream: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    async for raw in stream:
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if isinstance(event, dict):
            yield event


if __name__ == "__main__":
    sys.exit(child_main())

"""Bot under load: signed Slack events into the running bot at fixed rates, acks and replies measured.

    .venv/bin/python bench/bot_load.py                                 # 50 and 200 events/s, 60 s each
    .venv/bin/python bench/bot_load.py --rates 50,200 --duration 60 --channels 500
    .venv/bin/python bench/bot_load.py --database-url postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/bot_load.py --rates 50 --card-channel C0CARDS   # card mode (TRIAGE_CARD_CHANNEL)

Per rate, from scratch: a fresh database (SQLite file, or a throwaway PostgreSQL database on the server of
``--database-url``), a Slack stand-in (``tests/support/slack_standin.py``) and the bot
(``bot.main.start_bot``, HTTP mode, the embedded classifier on the packaged all-MiniLM-L6-v2 with untrained
heads, or ``--model-dir``; by default that classifier runs in the bot's child process, whose CPU is counted
on its own line).

* The bot runs in its own process by default, as in production: the load generator and the stand-in
  then do not share its event loop and GIL, so the ack latency is the bot's own (``--in-process``: one
  loop for everything, as the tests run it).
* Open loop: event *i* is due at ``i / rate`` and is sent then, whether or not earlier ones were answered
  (bounded connector, ``--connections``). Latencies are measured from the due time, so a late sender or
  a full connector counts against the result instead of hiding it.
* Messages go to ``--channels`` customer channels picked at random (TRIAGE_CHANNELS unset: every channel
  is watched), because the bot spaces its posts at ~1 per second per channel (Slack's limit).
* ~2% of the events are delivered again as Slack retries (same envelope, ``X-Slack-Retry-Num: 1``),
  0-2 s after the original, so some race it.
* After the schedule: wait for every reply, then ``--settle`` seconds more for late duplicates; if the bot
  logged warnings or errors, until no reply came for ``--stall`` seconds, since the bot's retry worker
  takes over a message left pending for 2 minutes (at most ``--drain-timeout``). Then stop the bot and
  count the stand-in's chat.postMessage calls per message ts and the rows in the database:
  lost = sent - replied; duplicates = replies beyond one per message.

Card mode (``--card-channel``, or TRIAGE_CARD_CHANNEL in the environment): the bot posts a card per message
to that one channel instead of replying in threads; cards are matched to messages by their permalink, and
the reply figures become the card lag (event -> card posted), lost and duplicate cards. One channel takes
about one post a second, so the drain waits a second more per card, and the lag is mostly that queue.
``bench/faults.py --cases kill --card-channel ...`` is the same with the bot killed and restarted.

The first rate is the baseline: the others are also shown as ratios of it. Output: a table on stdout,
JSON in ``bench/out/bot_load.json``, the bot's warnings per rate in ``bench/out/bot_load_<rate>.log``.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import gc
import hashlib
import json
import logging
import multiprocessing
import os
import platform
import random
import re
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable as `python bench/bot_load.py` from a checkout

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from bench.machine import cpu_name  # noqa: E402
from bot.storage.database import create_db_engine, resolve_database_url, upgrade_database  # noqa: E402
from bot.storage.models import Card, Message, MessageState, Prediction, SlackEvent  # noqa: E402
from tests.support.slack_standin import CUSTOMER_TEAM_ID, SLACK_USER_AGENT, SlackStandIn  # noqa: E402

OUT = ROOT / "bench" / "out"
STARTER = ROOT / "classifier" / "starter_data" / "starter.csv"
ACK_TARGET_MS = 100.0  # the target for the ack p99
SLACK_ACK_TIMEOUT_S = 3.0  # Slack retries a delivery not acked within 3 s
WARM_CHANNEL = "C0WARM"  # warm-up messages go to C0WARM000.. and are left out of every count
AGENT = "U0AGENT"
PERMALINK = re.compile(r"/archives/[A-Z0-9]+/p(\d{10})(\d{6})")


# ---- messages ------------------------------------------------------------------------------------------


def slack_escape(text: str) -> str:
    """Slack's wire format escapes &, < and > in message text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_texts(n: int, rng: random.Random) -> list[str]:
    """Customer messages of 5-60 words: starter-set support messages, some run together in twos or threes
    (people write several sentences), some mentioning an agent, in Slack's wire format."""
    with STARTER.open(newline="", encoding="utf-8") as f:
        pool = [row["text"].strip() for row in csv.DictReader(f) if row["text"].strip()]
    out: list[str] = []
    while len(out) < n:
        words = slack_escape(" ".join(rng.sample(pool, rng.choice((1, 1, 1, 2, 2, 3))))).split()
        if rng.random() < 0.1:
            words.insert(0, f"<@{AGENT}>")
        if len(words) >= 5:
            out.append(" ".join(words[:60]))
    return out


def code_fingerprint() -> dict[str, str]:
    """Which bot and classifier code ran: a hash of their sources and the newest file's time."""
    paths = sorted(
        [
            *ROOT.glob("bot/**/*.py"),
            *ROOT.glob("classifier/*.py"),
            *ROOT.glob("tests/support/slack_standin.py"),
        ]
    )
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    newest = max(path.stat().st_mtime for path in paths)
    return {
        "sha256": digest.hexdigest()[:12],
        "newest_file": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(newest)),
    }


# ---- model and database --------------------------------------------------------------------------------


def build_model(data_dir: Path, max_length: int) -> str:
    """An untrained multi-head model on the packaged all-MiniLM-L6-v2, as the registry's active version
    (like tests/support/tiny_model.make_tiny_version, on the real base): accuracy does not matter for
    speed."""
    import torch

    from classifier.model import MultiHeadClassifier
    from classifier.paths import default_base_model
    from classifier.registry import Registry, VersionInfo
    from classifier.schema import LabelSchema

    base = default_base_model()
    registry = Registry(data_dir / "models")
    torch.manual_seed(0)
    model, tokenizer = MultiHeadClassifier.from_base(base, LabelSchema())
    with registry.staging() as staging:
        model.save(staging, tokenizer, max_length=max_length)
        info = registry.commit(
            staging,
            VersionInfo(name="", created="", base_model=str(base), schema=model.schema.to_dict()),
            activate_if_first=True,
        )
    return info.name


def model_data_dir(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The TRIAGE_DATA_DIR the bot gets (its models/ registry holds the version to serve), described."""
    from classifier.registry import Registry

    if args.model_dir is None:
        print("building an untrained model on the packaged all-MiniLM-L6-v2 ...", file=sys.stderr)
        name = build_model(work / "data", args.max_length)
        return work / "data", f"{name}: untrained heads on all-MiniLM-L6-v2, max length {args.max_length}"
    data_dir = Path(args.model_dir).resolve()
    if data_dir.name == "models":  # the registry folder itself was given
        data_dir = data_dir.parent
    active = Registry(data_dir / "models").active()
    return data_dir, f"{active.name} from {data_dir / 'models'} (base {active.base_model})"


@contextlib.asynccontextmanager
async def fresh_database(database_url: str | None, work: Path, tag: str) -> AsyncIterator[str]:
    """A migrated, empty database for one rate: a SQLite file, or a throwaway PostgreSQL database."""
    if not database_url:
        url = f"sqlite+aiosqlite:///{work / f'bot_{tag}.db'}"
        await upgrade_database(url)
        yield url
        return
    import asyncpg

    server = resolve_database_url(database_url)
    name = f"triage_bench_{tag}_{secrets.token_hex(3)}"

    async def admin() -> Any:
        return await asyncpg.connect(
            host=server.host,
            port=server.port or 5432,
            user=server.username,
            password=server.password,
            database=server.database or "postgres",
        )

    conn = await admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        url = server.set(database=name).render_as_string(hide_password=False)
        await upgrade_database(url)
        yield url
    finally:
        conn = await admin()
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def count_rows(url: str) -> dict[str, Any]:
    """Messages by state, predictions and recorded event ids; warm-up messages left out."""
    engine = create_db_engine(url)
    measured = ~Message.channel_id.like(f"{WARM_CHANNEL}%")
    try:
        async with engine.connect() as conn:
            states = (
                await conn.execute(
                    select(Message.state, func.count()).where(measured).group_by(Message.state)
                )
            ).all()
            predictions = (
                await conn.execute(
                    select(func.count(), func.count(func.distinct(Prediction.message_id)))
                    .select_from(Prediction)
                    .join(Message, Message.id == Prediction.message_id)
                    .where(measured)
                )
            ).one()
            events = await conn.scalar(select(func.count()).select_from(SlackEvent))
            # card mode: a classified message without a card row is one the model called noise
            no_card = await conn.scalar(
                select(func.count())
                .select_from(Message)
                .outerjoin(Card, Card.message_id == Message.id)
                .where(measured, Message.state == MessageState.CLASSIFIED, Card.id.is_(None))
            )
    finally:
        await engine.dispose()
    by_state = {str(getattr(state, "value", state)): int(n) for state, n in states}
    return {
        "messages": sum(by_state.values()),
        "by_state": by_state,
        "predictions": int(predictions[0]),
        "extra_predictions": int(predictions[0]) - int(predictions[1]),  # more than one for a message
        "event_ids": int(events or 0),  # warm-up events included
        "classified_without_card": int(no_card or 0),
    }


# ---- the bot, in its own process or in this one --------------------------------------------------------


class LogTally(logging.Handler):
    """Counts the bot's warnings and errors by logger, keeping the first few messages."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.levelname} {record.name}"] += 1
        if len(self.first) < 8:
            self.first.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:300])

    def summary(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "first": list(self.first)}


def install_logging(log_path: Path) -> tuple[LogTally, logging.Handler]:
    tally = LogTally()
    to_file = logging.FileHandler(log_path, mode="w", encoding="utf-8")
    to_file.setLevel(logging.WARNING)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    root.addHandler(tally)
    root.addHandler(to_file)
    return tally, to_file


class GcPauses:
    """This process's cyclic garbage collections: each one stops its event loop while it runs."""

    def __init__(self) -> None:
        self.full = 0  # collections of the oldest generation (they walk every object not frozen)
        self.longest_s = 0.0
        self._started = 0.0
        gc.callbacks.append(self._collected)

    def _collected(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.longest_s = max(self.longest_s, time.perf_counter() - self._started)
        self.full += info["generation"] == 2

    def stats(self, reset: bool = False) -> dict[str, Any]:
        out = {"gc_full": self.full, "gc_longest_ms": self.longest_s * 1000}
        if reset:
            self.full, self.longest_s = 0, 0.0
        return out

    def close(self) -> None:
        gc.callbacks.remove(self._collected)


class Probe:
    """Samples the bot's classifier queue and the loop's task count (work in flight) twice a second, and
    records its process's garbage collections."""

    def __init__(self, bot: Any, tally: LogTally) -> None:
        self.bot = bot
        self.tally = tally
        self.max_queue = 0
        self.max_tasks = 0
        self.gc = GcPauses()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            engine = getattr(self.bot.triage.classifier, "engine", None)
            if engine is not None:
                self.max_queue = max(self.max_queue, engine.queue_depth)
            self.max_tasks = max(self.max_tasks, len(asyncio.all_tasks()))
            await asyncio.sleep(0.5)

    def stats(self, reset: bool = False) -> dict[str, Any]:
        engine = getattr(self.bot.triage.classifier, "engine", None)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out: dict[str, Any] = {
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "max_classifier_queue": self.max_queue,
            "max_loop_tasks": self.max_tasks,
            "problems": sum(self.tally.counts.values()),  # warnings and errors logged so far
            **self.gc.stats(reset),
        }
        if engine is not None:
            out.update(engine_batches=engine.stats.batches, engine_texts=engine.stats.texts)
        child = getattr(self.bot.triage.classifier, "process", None)  # the embedded default's child
        if child is not None and child.pid is not None:
            out["classifier_cpu_s"] = process_cpu_s(child.pid)
        from classifier.engine import FORWARD_SECONDS  # process-wide: this is the bot's process

        for metric in FORWARD_SECONDS.collect():
            out["forward_s"] = sum(s.value for s in metric.samples if s.name.endswith("_sum"))
        if reset:
            self.max_queue = self.max_tasks = 0
        return out

    async def close(self) -> None:
        self._task.cancel()
        self.gc.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _bot_process(conn: Connection, settings: dict[str, Any], data_dir: str, log_path: str) -> None:
    """Child process: start the bot, answer "stats" and "stop" from the parent."""
    os.environ["TRIAGE_DATA_DIR"] = data_dir
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tally, _ = install_logging(Path(log_path))

    async def serve() -> None:
        from bot.main import freeze_startup_heap, start_bot
        from bot.settings import load_settings

        try:
            bot = await start_bot(load_settings(_env_file=None, **settings))
        except Exception as exc:
            conn.send({"error": f"{type(exc).__name__}: {exc}"})
            return
        freeze_startup_heap()  # as bot.main.run_bot does
        probe = Probe(bot, tally)
        conn.send({"port": bot.port})
        loop = asyncio.get_running_loop()
        while True:
            try:
                command = await loop.run_in_executor(None, conn.recv)
            except EOFError:  # the parent is gone
                command = "stop"
            if command == "stop":
                break
            conn.send(probe.stats(reset=command == "stats-reset"))
        await bot.stop()
        stats = probe.stats()
        await probe.close()
        with contextlib.suppress(OSError):
            conn.send({**stats, "log": tally.summary()})

    asyncio.run(serve())


class BotHandle(Protocol):
    async def start(self, settings: dict[str, Any], data_dir: Path, log_path: Path) -> int: ...

    async def stats(self, reset: bool = False) -> dict[str, Any]: ...

    async def stop(self) -> dict[str, Any]: ...


class BotProcess:
    """The bot in a spawned child process (its own interpreter, event loop and GIL)."""

    def __init__(self) -> None:
        self._conn: Connection | None = None
        self._proc: Any = None
        self._final: dict[str, Any] | None = None

    async def _ask(self, message: str | None, wait_s: float) -> dict[str, Any]:
        assert self._conn is not None
        conn = self._conn
        if message is not None:
            conn.send(message)
        ready = await asyncio.get_running_loop().run_in_executor(None, conn.poll, wait_s)
        if not ready:
            raise TimeoutError(f"the bot process did not answer {message or 'start'} within {wait_s:g} s")
        answer: dict[str, Any] = conn.recv()
        return answer

    async def start(self, settings: dict[str, Any], data_dir: Path, log_path: Path) -> int:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._proc = context.Process(
            target=_bot_process, args=(child, settings, str(data_dir), str(log_path)), daemon=True
        )
        self._proc.start()
        answer = await self._ask(None, 120)
        if "error" in answer:
            raise RuntimeError(f"the bot did not start: {answer['error']}")
        return int(answer["port"])

    async def stats(self, reset: bool = False) -> dict[str, Any]:
        return await self._ask("stats-reset" if reset else "stats", 30)

    def kill(self) -> None:
        """``kill -9`` of the bot process (a crash: nothing is flushed or closed); waits until it is gone."""
        if self._proc is not None:
            self._proc.kill()  # our own child, by its handle: SIGKILL
            self._proc.join(30)
            self._final = {"error": "killed"}

    async def stop(self) -> dict[str, Any]:
        if self._final is None and self._proc is not None:
            try:
                self._final = await self._ask("stop", 90)
            except (TimeoutError, EOFError, OSError) as exc:
                self._final = {"error": f"stopping the bot: {exc}"}
            await asyncio.get_running_loop().run_in_executor(None, self._proc.join, 30)
            if self._proc.is_alive():
                self._proc.terminate()  # our own child, by its handle
        return self._final or {}


class InProcessBot:
    """The bot on this process's event loop, as the tests start it."""

    def __init__(self) -> None:
        self._bot: Any = None
        self._probe: Probe | None = None
        self._logging: tuple[LogTally, logging.Handler] | None = None
        self._final: dict[str, Any] | None = None

    async def start(self, settings: dict[str, Any], data_dir: Path, log_path: Path) -> int:
        os.environ["TRIAGE_DATA_DIR"] = str(data_dir)
        from bot.main import start_bot
        from bot.settings import load_settings

        self._logging = install_logging(log_path)
        self._bot = await start_bot(load_settings(_env_file=None, **settings))
        self._probe = Probe(self._bot, self._logging[0])
        return int(self._bot.port)

    async def stats(self, reset: bool = False) -> dict[str, Any]:
        assert self._probe is not None
        return {**self._probe.stats(reset), "cpu_s": None}  # not separable from the load generator

    async def stop(self) -> dict[str, Any]:
        if self._final is None and self._bot is not None and self._probe is not None:
            await self._bot.stop()
            self._final = {**self._probe.stats(), "cpu_s": None}
            await self._probe.close()
            if self._logging is not None:
                tally, to_file = self._logging
                self._final["log"] = tally.summary()
                logging.getLogger().removeHandler(tally)
                logging.getLogger().removeHandler(to_file)
                to_file.close()
        return self._final or {}


# ---- load ----------------------------------------------------------------------------------------------


@dataclass
class Delivery:
    """One POST to the bot: an event's first delivery or a Slack retry of it."""

    due: float  # seconds after the start of the schedule
    index: int  # which event
    retry: bool
    started: float = 0.0  # loop time
    done: float = 0.0
    status: int = 0  # HTTP status; -1: no answer (timeout, connection error)
    error: str = ""


@dataclass
class Event:
    due: float
    channel: str
    ts: str = ""
    body: bytes = b""
    replies: list[float] = field(default_factory=list)  # stand-in arrival times (epoch) of replies


def card_of(call: Any) -> str | None:
    """The ts of the message a card is about, read from the card's permalink to it (Slack's format:
    ``/archives/<channel>/p<ts without its dot>``)."""
    found = PERMALINK.search(json.dumps(call.args.get("blocks") or []))
    return f"{found[1]}.{found[2]}" if found else None


class ReplyTracker:
    """Reads the stand-in's recorded chat.postMessage calls as they arrive: replies per message ts, or in
    card mode (``card_channel``) cards per message ts."""

    def __init__(self, slack: SlackStandIn, card_channel: str | None = None) -> None:
        self.slack = slack
        self.card_channel = card_channel
        self.by_ts: dict[str, Event] = {}
        self.replied = 0  # events with at least one reply (card)
        self.posts = 0  # replies (cards), duplicates included
        self.failed_posts = 0  # chat.postMessage calls the stand-in refused
        self._seen = 0

    def _about(self, call: Any) -> str | None:
        if self.card_channel is None:
            return str(call.args.get("thread_ts"))
        return card_of(call) if call.args.get("channel") == self.card_channel else None

    def update(self) -> None:
        calls = self.slack.calls
        for call in calls[self._seen :]:
            if call.method != "chat.postMessage":
                continue
            event = self.by_ts.get(str(self._about(call)))
            if event is None:
                continue
            if not call.ok:
                self.failed_posts += 1
                continue
            if not event.replies:
                self.replied += 1
            self.posts += 1
            event.replies.append(call.time)
        self._seen = len(calls)


def percentiles(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    arr = np.asarray(values) * scale
    return {
        "p50": float(np.percentile(arr, 50)),
        "p99": float(np.percentile(arr, 99)),
        "max": float(arr.max()),
    }


def cpu_busy_s() -> float | None:
    """CPU seconds the whole machine spent busy since boot (all cores), from /proc/stat."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds another process has used so far (user + system), from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuMark:
    """CPU seconds used so far: the whole machine, this process (load generator + stand-in), the bot."""

    t: float
    busy: float | None
    own: float
    bot: float | None
    forward: float | None  # seconds the bot's classifier spent in forward passes
    classifier: float | None  # CPU seconds of the bot's classifier process (the embedded default)


async def cpu_mark(bot: BotHandle) -> CpuMark:
    stats = await bot.stats()
    return CpuMark(
        time.monotonic(),
        cpu_busy_s(),
        own_cpu_s(),
        stats.get("cpu_s"),
        stats.get("forward_s"),
        stats.get("classifier_cpu_s"),
    )


def cores(a: CpuMark, b: CpuMark) -> dict[str, float | None]:
    """Cores used on average between two marks; "others" is every other process on the machine."""
    dt = max(b.t - a.t, 1e-9)
    bot = (b.bot - a.bot) / dt if a.bot is not None and b.bot is not None else None
    generator = (b.own - a.own) / dt
    busy = (b.busy - a.busy) / dt if a.busy is not None and b.busy is not None else None
    child = (
        (b.classifier - a.classifier) / dt if a.classifier is not None and b.classifier is not None else None
    )
    others = busy - generator - (bot or 0.0) - (child or 0.0) if busy is not None else None
    forward = (b.forward - a.forward) / dt if a.forward is not None and b.forward is not None else None
    return {
        "seconds": dt,
        "bot": bot,
        "generator": generator,
        "others": others,
        "busy": busy,
        "classifier_forward": forward,  # share of the time the classifier was in a forward pass
        "classifier_process": child,  # the bot's classifier in its child process
    }


def top_snapshot() -> list[str]:
    """`top -bn1`'s summary line and its busiest processes, for the record."""
    try:
        lines = subprocess.run(
            ["top", "-bn1"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []
    header = next((i for i, line in enumerate(lines) if line.strip().startswith("PID")), None)
    if header is None:
        return lines[:1]
    return [lines[0].strip(), *(line.rstrip()[:160] for line in lines[header + 1 : header + 6])]


async def post(
    session: aiohttp.ClientSession, url: str, slack: SlackStandIn, delivery: Delivery, body: bytes
) -> None:
    """Deliver one envelope, signed as Slack signs it; records when it was answered and how."""
    loop = asyncio.get_running_loop()
    delivery.started = loop.time()
    headers = {"Content-Type": "application/json", "User-Agent": SLACK_USER_AGENT, "Accept": "*/*"}
    headers.update(slack.sign(body))
    if delivery.retry:
        headers.update({"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"})
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
            await response.read()
            delivery.status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        delivery.status, delivery.error = -1, type(exc).__name__
    delivery.done = loop.time()


async def warm_up(
    slack: SlackStandIn,
    session: aiohttp.ClientSession,
    url: str,
    texts: list[str],
    count: int,
    card_channel: str | None = None,
) -> None:
    """A few messages before measuring: the embedded classifier loads its model on the first one."""
    tracker = ReplyTracker(slack, card_channel)
    deliveries = []
    for i in range(count):
        event = slack.message_event(f"{WARM_CHANNEL}{i:03d}", "U0WARMUP", texts[i % len(texts)])
        envelope = slack.event_envelope(event, event_id=f"Ev0WARM{i:05d}")
        tracker.by_ts[event["ts"]] = Event(0.0, event["channel"], event["ts"])
        deliveries.append(post(session, url, slack, Delivery(0.0, i, False), json.dumps(envelope).encode()))
    await asyncio.gather(*deliveries)
    deadline = time.monotonic() + 180
    while True:
        tracker.update()
        if tracker.replied >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm-up: {tracker.replied}/{count} answered in 180 s; see the bot's log")
        await asyncio.sleep(0.2)


def add_customers(slack: SlackStandIn) -> None:
    """The senders (U0WARMUP, U0C00000..U0C04999) as users of another organization: only customers'
    messages are triaged (the stand-in makes up anyone else as a member of the bot's workspace: an agent).
    Their organization is known to team.info, as a real one is: cards name it without a warning."""
    slack.add_team(CUSTOMER_TEAM_ID, "Customer Co")
    for user in ["U0WARMUP", *(f"U0C{i:05d}" for i in range(5000))]:
        slack.add_user(user, team_id=CUSTOMER_TEAM_ID)


def card_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Card mode (``--card-channel``): every triaged message becomes a card there instead of a reply."""
    return {"triage_card_channel": args.card_channel} if args.card_channel else {}


def drain_timeout(args: argparse.Namespace, events: int) -> float:
    """How long to wait for the replies after sending; in card mode a second more per card, since one
    channel takes about one post a second (the bot paces them: the card lag is mostly that queue)."""
    return args.drain_timeout + (events if args.card_channel else 0)


async def run_rate(args: argparse.Namespace, rate: float, data_dir: Path, work: Path) -> dict[str, Any]:
    tag = f"{rate:g}".replace(".", "_")
    rng = random.Random(args.seed)
    n = round(rate * args.duration)
    texts = slack_texts(n, rng)
    channels = [f"C0CUST{i:05d}" for i in range(args.channels)]
    events = [Event(i / rate, rng.choice(channels)) for i in range(n)]
    deliveries = [Delivery(e.due, i, False) for i, e in enumerate(events)]
    for i in sorted(rng.sample(range(n), round(n * args.retry_share))):
        deliveries.append(Delivery(events[i].due + rng.uniform(0.0, 2.0), i, True))
    deliveries.sort(key=lambda d: (d.due, d.retry))  # an original always goes before its retry
    log_path = OUT / f"bot_load_{tag}.log"

    async with contextlib.AsyncExitStack() as stack:
        database_url = await stack.enter_async_context(fresh_database(args.database_url, work, tag))
        slack = SlackStandIn()
        await slack.start()
        stack.push_async_callback(slack.close)
        add_customers(slack)
        bot: BotHandle = InProcessBot() if args.in_process else BotProcess()
        settings = {
            "slack_bot_token": slack.bot_token,
            "slack_signing_secret": slack.signing_secret,
            "slack_api_url": slack.api_url,
            "database_url": database_url,
            "host": "127.0.0.1",
            "port": 0,
            "triage_retrain_cron": "",  # no scheduled retraining in the middle of a benchmark
            **card_settings(args),
        }
        print(f"[{rate:g}/s] starting the bot ...", file=sys.stderr)
        code = code_fingerprint()
        port = await bot.start(settings, data_dir, log_path)
        stack.push_async_callback(bot.stop)
        url = f"http://127.0.0.1:{port}/slack/events"
        # force_close like the stand-in's own client: a fresh connection per delivery
        connector = aiohttp.TCPConnector(limit=args.connections, force_close=True)
        session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10))
        stack.push_async_callback(session.close)
        await warm_up(slack, session, url, texts, args.warmup, args.card_channel)

        tracker = ReplyTracker(slack, args.card_channel)
        loop = asyncio.get_running_loop()
        # the generator's start-up heap (torch, from building the model) is left out of its garbage
        # collections as the bot's is: a full collection of it stalls the schedule, counted against the bot
        gc.collect()
        gc.freeze()
        generator_gc = GcPauses()
        stack.callback(generator_gc.close)
        load_before = os.getloadavg()
        top_before = top_snapshot()
        bot_before = await bot.stats(reset=True)
        mark_start = await cpu_mark(bot)
        t0 = loop.time() + 0.1
        wall0 = time.time() - loop.time() + t0  # epoch time of t0: replies are stamped with time.time()
        timeline: list[dict[str, float]] = []
        tasks: set[asyncio.Task[None]] = set()
        print(f"[{rate:g}/s] sending {n} events (+{len(deliveries) - n} retries) ...", file=sys.stderr)

        async def sample() -> None:
            while True:
                await asyncio.sleep(1.0)
                tracker.update()
                now = loop.time() - t0
                sent = sum(1 for d in deliveries if d.started and not d.retry)
                acked = sum(1 for d in deliveries if d.done)
                timeline.append(
                    {"t": round(now, 2), "sent": sent, "acked": acked, "replied": tracker.replied}
                )
                if len(timeline) % 10 == 0:
                    print(
                        f"  t={now:5.0f}s sent {sent} acked {acked} replied {tracker.replied} "
                        f"backlog {sent - tracker.replied}",
                        file=sys.stderr,
                    )

        sampler = asyncio.ensure_future(sample())
        for delivery in deliveries:
            delay = t0 + delivery.due - loop.time()
            await asyncio.sleep(max(0.0, delay))  # behind schedule: send at once, but let posts start
            event = events[delivery.index]
            if not delivery.retry:  # built when due, so its ts is the real time of sending
                message = slack.message_event(
                    event.channel, f"U0C{rng.randrange(5000):05d}", texts[delivery.index]
                )
                envelope = slack.event_envelope(message, event_id=f"Ev0LD{delivery.index:07d}")
                event.ts, event.body = message["ts"], json.dumps(envelope).encode()
                tracker.by_ts[event.ts] = event
            task = asyncio.ensure_future(post(session, url, slack, delivery, event.body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        send_end = loop.time()
        load_sent = os.getloadavg()
        mark_sent = await cpu_mark(bot)
        if tasks:
            await asyncio.gather(*tasks)
        print(f"[{rate:g}/s] all sent and acked; waiting for replies ...", file=sys.stderr)

        # Drain: until every message has a reply and --settle s passed; if the bot logged problems, until
        # no reply came for --stall s (past the 2-minute lease after which the bot retries a message); at
        # most --drain-timeout s.
        deadline = loop.time() + drain_timeout(args, n)
        posts, last_post, complete_at, problems, checked = -1, loop.time(), 0.0, 0, 0.0
        while (now := loop.time()) < deadline and now - last_post < args.stall:
            tracker.update()
            if tracker.posts != posts:
                posts, last_post = tracker.posts, now
            if now - checked >= 5.0:
                problems, checked = (await bot.stats()).get("problems", 0), now
            if tracker.replied < n:
                complete_at = 0.0
            elif not complete_at:
                complete_at = now
            elif now - complete_at >= args.settle and not problems:
                break
            await asyncio.sleep(0.25)
        measured_end = loop.time()
        mark_end = await cpu_mark(bot)
        bot_after = await bot.stats()
        generator_after = generator_gc.stats()
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        bot_final = await bot.stop()  # drains the bot's own background work
        tracker.update()  # posts made while stopping count too
        rows = await count_rows(database_url)

    # ---- figures ----
    window = measured_end - t0
    originals = [d for d in deliveries if not d.retry]
    starts = sorted(d.started for d in originals)
    achieved = (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) > 1 else 0.0
    answered = [d for d in deliveries if d.status == 200]
    first_replies = [(i, min(e.replies)) for i, e in enumerate(events) if e.replies]
    reply_latency = [t - (wall0 + events[i].due) for i, t in first_replies]
    replied = len(first_replies)
    send_end_wall = wall0 + (send_end - t0)
    last_reply = max((t for _, t in first_replies), default=send_end_wall)
    tenth = max(1, round(rate * min(10.0, args.duration / 3)))  # first and last ~10 s of the schedule
    early = [lat for (i, _), lat in zip(first_replies, reply_latency, strict=True) if i < tenth]
    late = [lat for (i, _), lat in zip(first_replies, reply_latency, strict=True) if i >= n - tenth]
    last_in_channel: dict[str, float] = {}
    paced = 0  # messages posted within 1 s of the previous one in their channel: the pacer delays them
    for e in events:
        if e.due - last_in_channel.get(e.channel, -10.0) < 1.0:
            paced += 1
        last_in_channel[e.channel] = e.due
    texts_done = bot_after.get("engine_texts", 0) - bot_before.get("engine_texts", 0)
    batches = bot_after.get("engine_batches", 0) - bot_before.get("engine_batches", 0)
    words = [len(t.split()) for t in texts]
    return {
        "offered_rate": rate,
        "code": code,
        "achieved_rate": achieved,
        "duration_s": args.duration,
        "events": n,
        "retries": len(deliveries) - n,
        "channels": args.channels,
        "paced_share": paced / n if n else 0.0,
        "message_words": {"median": float(np.median(words)), "max": max(words), "min": min(words)},
        "sender_lag_ms": percentiles([d.started - (t0 + d.due) for d in deliveries]),
        "ack_ms": percentiles([d.done - (t0 + d.due) for d in answered]),
        "ack_ms_from_send": percentiles([d.done - d.started for d in answered]),
        "acks_over_3s": sum(1 for d in answered if d.done - (t0 + d.due) > SLACK_ACK_TIMEOUT_S),
        "ack_statuses": dict(Counter(str(d.status) if d.status > 0 else d.error for d in deliveries)),
        "reply_ms": percentiles(reply_latency),
        "reply_p50_first_10s_ms": percentiles(early)["p50"],
        "reply_p50_last_10s_ms": percentiles(late)["p50"],
        "reply_rate": replied / (last_reply - wall0) if replied and last_reply > wall0 else 0.0,
        "backlog_at_send_end": n - sum(1 for _, t in first_replies if t <= send_end_wall),
        "drain_s": max(0.0, last_reply - send_end_wall),
        "replied": replied,
        "lost": n - replied,
        "duplicates": sum(len(e.replies) - 1 for e in events if e.replies),
        "refused_posts": tracker.failed_posts,
        "db": rows,
        "db_lost": n - rows["messages"],  # acked, but never stored
        "bot": {
            "texts_per_forward": texts_done / batches if batches else None,
            "max_classifier_queue": bot_after.get("max_classifier_queue"),
            "max_loop_tasks": bot_after.get("max_loop_tasks"),
            "gc_full": bot_after.get("gc_full"),  # while measured: from the first event to the drain's end
            "gc_longest_ms": bot_after.get("gc_longest_ms"),
            "log": bot_final.get("log", {}),
            "stop_error": bot_final.get("error"),
        },
        "machine": {
            "loadavg_before": load_before,
            "loadavg_send_end": load_sent,
            "generator_gc": generator_after,
            "top_before": top_before,
            "window_s": window,
            "cores_while_sending": cores(mark_start, mark_sent),
            "cores_whole_run": cores(mark_start, mark_end),
        },
        "timeline": timeline,
    }


# ---- report --------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def report(result: dict[str, Any]) -> str:
    runs = result["runs"]
    base = runs[0]
    words = base["message_words"]
    what = "card" if result.get("card_channel") else "reply"
    rows: list[tuple[str, Any, int, bool]] = [  # label, how to get it, digits, show a ratio
        ("offered rate (events/s)", lambda r: r["offered_rate"], 1, True),
        ("achieved send rate (events/s)", lambda r: r["achieved_rate"], 1, True),
        ("events sent (+ Slack retries)", lambda r: f"{r['events']} (+{r['retries']})", 0, False),
        ("sender lag p99 (ms)", lambda r: r["sender_lag_ms"]["p99"], 1, False),
        ("ack p50 (ms)", lambda r: r["ack_ms"]["p50"], 1, True),
        ("ack p99 (ms)", lambda r: r["ack_ms"]["p99"], 1, True),
        ("ack max (ms)", lambda r: r["ack_ms"]["max"], 1, True),
        ("ack p99 from actual send (ms)", lambda r: r["ack_ms_from_send"]["p99"], 1, True),
        ("acks > 3 s / not 200", lambda r: f"{r['acks_over_3s']} / {_not_ok(r)}", 0, False),
        (f"event -> {what} p50 (ms)", lambda r: r["reply_ms"]["p50"], 0, True),
        (f"event -> {what} p99 (ms)", lambda r: r["reply_ms"]["p99"], 0, True),
        (f"{what} p50 first / last 10 s (ms)", _growth, 0, False),
        (f"{what}s/s (sent -> last {what})", lambda r: r["reply_rate"], 1, True),
        ("backlog when sending ended", lambda r: r["backlog_at_send_end"], 0, False),
        ("drain after sending ended (s)", lambda r: r["drain_s"], 1, False),
        (f"messages with a {what}", lambda r: r["replied"], 0, False),
        (f"LOST (sent - with a {what})", lambda r: r["lost"], 0, False),
        ("  of which acked but never stored", lambda r: r["db_lost"], 0, False),
        (f"DUPLICATE {what}s", lambda r: r["duplicates"], 0, False),
        ("db messages / extra predictions", _db_rows, 0, False),
        ("classified without a card (noise)", lambda r: r["db"]["classified_without_card"], 0, False),
        ("db states", _db_states, 0, False),
        ("bot CPU while sending (cores)", lambda r: _cores(r, "bot"), 2, True),
        ("its classifier process CPU (cores)", lambda r: _cores(r, "classifier_process"), 2, True),
        ("texts per forward pass", lambda r: r["bot"]["texts_per_forward"], 1, False),
        ("classifier in forward pass (sending)", lambda r: _cores(r, "classifier_forward"), 2, False),
        ("max classifier queue / loop tasks", _in_flight, 0, False),
        ("bot GC: full collections / longest (ms)", lambda r: _gc(r["bot"]), 0, False),
        ("generator GC: full / longest (ms)", lambda r: _gc(r["machine"]["generator_gc"]), 0, False),
        ("bot warnings+errors", lambda r: sum(r["bot"]["log"].get("counts", {}).values()), 0, False),
        ("stand-in+generator CPU (sending)", lambda r: _cores(r, "generator"), 2, False),
        ("other processes CPU (sending)", lambda r: _cores(r, "others"), 2, False),
        ("load average before (1 min)", lambda r: r["machine"]["loadavg_before"][0], 2, False),
        ("load average when sending ended", lambda r: r["machine"]["loadavg_send_end"][0], 2, False),
    ]
    names = [f"{r['offered_rate']:g}/s" for r in runs]
    ratio_names = [f"{name} / {names[0]}" for name in names[1:]]
    table: list[tuple[str, list[str]]] = []
    for label, get, digits, ratio in rows:
        values = [get(r) for r in runs]
        cells = [_fmt(v, digits) for v in values]
        for v in values[1:]:
            ok = ratio and isinstance(v, int | float) and isinstance(values[0], int | float) and values[0]
            cells.append(f"{v / values[0]:.2f}x" if ok else "")
        table.append((label, cells))
    width = 2 + max(len(label) for label, _ in table)
    col = 2 + max(len(c) for c in [*names, *ratio_names, *(c for _, cells in table for c in cells)])
    codes = {f"{r['code']['sha256']} (newest file {r['code']['newest_file']})" for r in runs}
    lines = [
        f"bot: {result['bot_mode']}; model {result['model']}; database {result['database']}",
        f"bot code: {', '.join(sorted(codes))}" + (" -- CHANGED BETWEEN RATES" if len(codes) > 1 else ""),
        f"{result['cpus']} CPUs ({result['cpu_name'] or '?'}); {base['channels']} customer channels picked "
        f"at random (the bot posts <= 1/s per channel); ~{result['retry_share']:.0%} of events resent as "
        f"Slack retries; {base['duration_s']:g} s per rate; message words median "
        f"{words['median']:g} ({words['min']}-{words['max']})",
        "latencies are from each event's due time (open loop); ack = the bot's HTTP answer, "
        + (
            f"card = its post in the card channel {result['card_channel']} (card lag; ~1 post/s per channel)"
            if what == "card"
            else "reply = its threaded chat.postMessage at the stand-in"
        ),
        "",
        f"{'':<{width}}" + "".join(f"{n:>{col}}" for n in names + ratio_names),
    ]
    for label, cells in table:
        lines.append(f"{label:<{width}}" + "".join(f"{c:>{col}}" for c in cells))
    lines.append("")
    for r in runs:
        p99 = r["ack_ms"]["p99"]
        verdict = [
            f"ack p99 {_fmt(p99)} ms {'<' if p99 is not None and p99 < ACK_TARGET_MS else '>='} "
            f"{ACK_TARGET_MS:g} ms target",
            f"lost {r['lost']}",
            f"duplicates {r['duplicates']}",
        ]
        ok = p99 is not None and p99 < ACK_TARGET_MS and r["lost"] == 0 and r["duplicates"] == 0
        lines.append(f"{r['offered_rate']:g}/s: {'PASS' if ok else 'FAIL'} ({'; '.join(verdict)})")
        for line in r["bot"]["log"].get("first", [])[:3]:
            lines.append(f"    bot log: {line[:150]}")
    return "\n".join(lines)


def _not_ok(run: dict[str, Any]) -> int:
    return sum(n for status, n in run["ack_statuses"].items() if status != "200")


def _db_rows(run: dict[str, Any]) -> str:
    return f"{run['db']['messages']} / {run['db']['extra_predictions']}"


def _db_states(run: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(run["db"]["by_state"].items()))


def _in_flight(run: dict[str, Any]) -> str:
    return f"{run['bot']['max_classifier_queue']} / {run['bot']['max_loop_tasks']}"


def _gc(stats: dict[str, Any]) -> str:
    return f"{_fmt(stats.get('gc_full'))} / {_fmt(stats.get('gc_longest_ms'), 0)}"


def _cores(run: dict[str, Any], who: str) -> float | None:
    value: float | None = run["machine"]["cores_while_sending"].get(who)
    return value


def _growth(run: dict[str, Any]) -> str:
    return f"{_fmt(run['reply_p50_first_10s_ms'], 0)} / {_fmt(run['reply_p50_last_10s_ms'], 0)}"


# ---- main ----------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="triage-bot-load-") as tmp:
        work = Path(tmp)
        data_dir, model = model_data_dir(args, work)
        runs = []
        for rate in args.rates:
            runs.append(await run_rate(args, rate, data_dir, work))
            r = runs[-1]
            print(
                f"[{rate:g}/s] ack p99 {_fmt(r['ack_ms']['p99'])} ms, reply/card p99 "
                f"{_fmt(r['reply_ms']['p99'], 0)} ms, lost {r['lost']}, duplicates {r['duplicates']}",
                file=sys.stderr,
            )
    database = "SQLite file (fresh per rate)"
    if args.database_url:
        shown = resolve_database_url(args.database_url).render_as_string(hide_password=True)
        database = f"PostgreSQL, a throwaway database per rate on {shown}"
    return {
        "bot_mode": "same process as the load generator" if args.in_process else "own process",
        "model": model,
        "database": database,
        "cpus": os.cpu_count(),
        "cpu_name": cpu_name(),
        "python": platform.python_version(),
        "retry_share": args.retry_share,
        "card_channel": args.card_channel,
        "connections": args.connections,
        "runs": runs,
        "ratios_vs_first_rate": {
            f"{r['offered_rate']:g}": {
                "achieved_rate": _ratio(r["achieved_rate"], runs[0]["achieved_rate"]),
                "ack_p50": _ratio(r["ack_ms"]["p50"], runs[0]["ack_ms"]["p50"]),
                "ack_p99": _ratio(r["ack_ms"]["p99"], runs[0]["ack_ms"]["p99"]),
                "reply_p50": _ratio(r["reply_ms"]["p50"], runs[0]["reply_ms"]["p50"]),
                "reply_p99": _ratio(r["reply_ms"]["p99"], runs[0]["reply_ms"]["p99"]),
                "reply_rate": _ratio(r["reply_rate"], runs[0]["reply_rate"]),
            }
            for r in runs[1:]
        },
    }


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def add_card_channel_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--card-channel",
        default=os.environ.get("TRIAGE_CARD_CHANNEL") or None,
        help="Card mode: TRIAGE_CARD_CHANNEL for the bot (default: that variable); cards are counted there "
        "instead of thread replies",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rates", default="50,200", help="Events per second, comma-separated [50,200]")
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds of sending per rate [60]")
    parser.add_argument("--channels", type=int, default=500, help="Customer channels to spread over [500]")
    parser.add_argument(
        "--database-url", default=None, help="PostgreSQL server to make throwaway databases on"
    )
    parser.add_argument("--model-dir", default=None, help="A TRIAGE_DATA_DIR whose models/ registry to serve")
    parser.add_argument("--max-length", type=int, default=128, help="Max tokens of the built model [128]")
    parser.add_argument("--retry-share", type=float, default=0.02, help="Events resent as retries [0.02]")
    parser.add_argument("--connections", type=int, default=100, help="Concurrent deliveries at most [100]")
    parser.add_argument("--warmup", type=int, default=10, help="Unmeasured messages first [10]")
    parser.add_argument("--drain-timeout", type=float, default=300.0, help="Wait this long for replies [300]")
    parser.add_argument("--settle", type=float, default=10.0, help="Then this long for duplicates [10]")
    parser.add_argument(
        "--stall",
        type=float,
        default=150.0,
        help="If the bot logged problems: wait for no reply this long [150]",
    )
    parser.add_argument("--in-process", action="store_true", help="Run the bot on the generator's loop")
    add_card_channel_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=OUT / "bot_load.json", help="[bench/out/bot_load.json]")
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    result = asyncio.run(run(args))
    print(report(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nJSON: {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Fault injection: the bot at a steady 50 messages/s against the Slack stand-in, one fault at a time.

    .venv/bin/python bench/faults.py                                   # every case, about 15 minutes
    .venv/bin/python bench/faults.py --cases kill,database --classifier-outage-s 600

Each case starts from scratch: a throwaway PostgreSQL database (on the server of ``--database-url``, reached
through a TCP proxy this script controls), the Slack stand-in (``tests/support/slack_standin.py``), and the
bot in its own process on the embedded classifier (``bench/bot_load.py``'s machinery: load, stand-in, bot
process, reply tracking). ``--duration`` seconds of messages at ``--rate``; the fault starts at
``--fault-at`` s:

* ``kill``: ``kill -9`` of the bot, then a new bot process on the same port (with ``--slack-retries ""``
  Slack never redelivers what the dead bot missed: only the restarted bot's backfill can answer it);
* ``database``: PostgreSQL unreachable for ``--database-outage-s`` (30) s: the proxy drops every
  connection and stops listening (connection refused), then listens again;
* ``classifier``: the classifier server (``triage serve``, behind the same kind of proxy, used by the bot
  through ``CLASSIFIER_URL``) unreachable for ``--classifier-outage-s`` s (default 60; the issue asks 600);
* ``slack429``: a 429 storm: every ``chat.postMessage`` answered ``ratelimited`` with ``Retry-After: 1``
  for ``--storm-s`` (20) s;
* ``diskfull``: a retrain (``python -m bot.retrain``) while the bot runs, with the data directory on a
  tmpfs with room for the active version but not for the candidate (needs root and ``mount``; if the mount
  is refused, the case says so and is skipped).

Slack's side is emulated: a delivery not answered 200 within 3 s is delivered again (``X-Slack-Retry-Num``)
after ``--slack-retries`` seconds (Slack: at once, after a minute, after five), then given up. Counted per
case: messages sent, acknowledged (some delivery answered 200), answered (a threaded reply reached the
stand-in), lost (sent - answered: must be 0), duplicated (replies beyond one per message: must be 0), and
whether the active model stayed untouched (``ACTIVE`` and every file of that version byte-identical).
The model is a tiny BERT (tests/support/tiny_model.py) trained a few steps on the starter set: the figures are
counts, not speeds. Output: a table on stdout, ``bench/out/faults.json``, the bot's warnings and errors per
case in ``bench/out/faults_<case>.log``. ``--card-channel`` (card mode, as in ``bench/bot_load.py``): the
answers counted are the cards in that channel. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable as `python bench/faults.py` from a checkout

import aiohttp  # noqa: E402

from bench.bot_load import (  # noqa: E402
    OUT,
    STARTER,
    BotProcess,
    Delivery,
    Event,
    ReplyTracker,
    add_card_channel_argument,
    add_customers,
    card_settings,
    code_fingerprint,
    count_rows,
    drain_timeout,
    fresh_database,
    post,
    slack_texts,
    warm_up,
)
from bench.machine import cpu_name  # noqa: E402
from bot.retrain import RunOptions, RunRequest, start_child  # noqa: E402
from bot.storage.database import resolve_database_url  # noqa: E402
from bot.storage.models import TrainingTrigger  # noqa: E402
from tests.support.slack_standin import SlackStandIn  # noqa: E402
from tests.support.tcp_proxy import TcpProxy  # noqa: E402

CASES = ("kill", "database", "classifier", "slack429", "diskfull")
SLACK_ACK_TIMEOUT_S = 3.0
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the model -----------------------------------------------------------------------------------------


def build_model(data_dir: Path) -> str:
    """A tiny BERT trained a few steps on the starter set: a real version (weights, dataset.jsonl, eval/,
    and the ONNX files a served version has after its first load), small enough that a retrain takes
    seconds and a tmpfs can be sized around it."""
    from classifier.data import load_examples
    from classifier.onnx_backend import ensure_onnx
    from classifier.registry import Registry
    from classifier.schema import LabelSchema
    from classifier.train import TrainConfig, train
    from tests.support.tiny_model import make_tiny_bert

    base = make_tiny_bert(data_dir.parent / "tiny-bert")
    examples, schema = load_examples([STARTER], LabelSchema())
    config = TrainConfig(base_model=str(base), epochs=1, max_steps=20, max_length=64, learning_rate=1e-3)
    version = train(examples, schema, config, Registry(data_dir / "models"), progress=False).version
    ensure_onnx(version)
    return version.name


def active_fingerprint(data_dir: Path) -> str:
    """sha256 over ACTIVE and every file of the active version."""
    models = data_dir / "models"
    active = (models / "ACTIVE").read_text(encoding="utf-8").strip()
    digest = hashlib.sha256(active.encode())
    for path in sorted(p for p in (models / active).rglob("*") if p.is_file()):
        digest.update(path.relative_to(models).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{active}:{digest.hexdigest()[:16]}"


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- the classifier server (for the classifier case) ---------------------------------------------------


@contextlib.asynccontextmanager
async def classifier_server(data_dir: Path, token: str, log: Path) -> AsyncIterator[int]:
    """``triage serve`` on a free port, in its own process; yields the port once it is ready."""
    port = free_port()
    env = {**os.environ, "TRIAGE_DATA_DIR": str(data_dir), "CLASSIFIER_TOKEN": token, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "bot.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    out = await asyncio.to_thread(log.open, "wb")
    server = await asyncio.create_subprocess_exec(*command, env=env, cwd=ROOT, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 120
        while not await asyncio.to_thread(_ready, f"http://127.0.0.1:{port}/readyz"):
            if server.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the classifier server did not start; see {log}")
            await asyncio.sleep(0.5)
        yield port
    finally:
        if server.returncode is None:
            server.terminate()  # our own child, by its handle
        await asyncio.wait_for(server.wait(), 30)
        out.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


# ---- tmpfs (for the disk-full case) --------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path: Path, size_bytes: int) -> Any:
    """A tmpfs of ``size_bytes`` at ``path``; raises OSError with mount's message when it cannot mount."""
    path.mkdir(parents=True, exist_ok=True)
    kib = max(64, size_bytes // 1024)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kib}k,mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise OSError(f"mount -t tmpfs failed: {(result.stderr or result.stdout).strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ---- one case ------------------------------------------------------------------------------------------


@dataclass
class Case:
    """What a fault needs from the running case: the bot, the proxies, the stand-in, and its notes."""

    name: str
    args: argparse.Namespace
    settings: dict[str, Any]
    data_dir: Path
    database_url: str  # direct, not through the proxy
    slack: SlackStandIn
    db_proxy: TcpProxy
    log_path: Path
    bot: BotProcess
    classifier_proxy: TcpProxy | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0  # loop time the fault began
    finished: float = 0.0  # loop time the fault ended

    def url(self) -> str:
        """Where Slack delivers events: the bot's fixed port, whichever bot process is there now."""
        return f"http://127.0.0.1:{self.settings['port']}/slack/events"


async def fault_kill(case: Case) -> None:
    case.bot.kill()
    started = time.monotonic()
    case.bot = BotProcess()
    await case.bot.start(case.settings, case.data_dir, case.log_path.with_suffix(".restart.log"))
    case.notes["restart_s"] = round(time.monotonic() - started, 1)


async def fault_database(case: Case) -> None:
    await case.db_proxy.cut()
    await asyncio.sleep(case.args.database_outage_s)
    await case.db_proxy.restore()
    case.notes["outage_s"] = case.args.database_outage_s


async def fault_classifier(case: Case) -> None:
    assert case.classifier_proxy is not None
    await case.classifier_proxy.cut()
    await asyncio.sleep(case.args.classifier_outage_s)
    await case.classifier_proxy.restore()
    case.notes["outage_s"] = case.args.classifier_outage_s


async def fault_slack429(case: Case) -> None:
    fault = case.slack.fail_next("chat.postMessage", status=429, retry_after=1, count=None)
    await asyncio.sleep(case.args.storm_s)
    case.slack.clear_faults()
    case.notes.update(storm_s=case.args.storm_s, answered_429=fault.hits)


async def fault_diskfull(case: Case) -> None:
    os.environ.update(TRIAGE_DATA_DIR=str(case.data_dir), HF_HUB_OFFLINE="1")  # the child inherits them
    process = await start_child(
        RunRequest(RunOptions(epochs=1), TrainingTrigger.CLI, database_url=case.database_url)
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=600)
    done = [json.loads(line) for line in stdout.decode().splitlines() if line.startswith("{")]
    summary = next((e.get("summary") for e in done if e.get("event") == "done"), None)
    usage = shutil.disk_usage(case.data_dir)
    case.notes.update(
        retrain_exit=process.returncode,
        retrain_summary=summary or stderr.decode(errors="replace")[-300:],
        staging_left=sorted(p.name for p in (case.data_dir / "models").glob(".staging-*")),
        versions=sorted(p.name for p in (case.data_dir / "models").iterdir() if p.name.startswith("v")),
        tmpfs_free_kib=usage.free // 1024,
    )


FAULTS: dict[str, Callable[[Case], Awaitable[None]]] = {
    "kill": fault_kill,
    "database": fault_database,
    "classifier": fault_classifier,
    "slack429": fault_slack429,
    "diskfull": fault_diskfull,
}


async def deliver(
    session: aiohttp.ClientSession,
    case: Case,
    event: Event,
    delivery: Delivery,
    retries: list[float],
    made: list[Delivery],
) -> None:
    """One event as Slack delivers it: again after each of ``retries`` seconds until answered 200;
    every delivery is appended to ``made`` as it starts."""
    made.append(delivery)
    await post(session, case.url(), case.slack, delivery, event.body)
    for delay in retries:
        if delivery.status == 200:
            return
        await asyncio.sleep(delay)
        delivery = Delivery(delivery.due + delay, delivery.index, True)
        made.append(delivery)
        await post(session, case.url(), case.slack, delivery, event.body)


async def run_case(name: str, args: argparse.Namespace, model_dir: Path, work: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    n = round(args.rate * args.duration)
    texts = slack_texts(n + args.warmup, rng)
    channels = [f"C0CUST{i:05d}" for i in range(args.channels)]
    events = [Event(i / args.rate, rng.choice(channels)) for i in range(n)]
    log_path = args.json.parent / f"{args.json.stem}_{name}.log"
    async with contextlib.AsyncExitStack() as stack:
        data_dir = work / name / "data"
        if name == "diskfull":
            # room for the active version and the run log, not for a candidate version
            size = tree_size(model_dir) + args.disk_headroom_kib * 1024
            try:
                stack.enter_context(small_tmpfs(data_dir, size))
            except OSError as exc:
                return {"case": name, "skipped": f"cannot mount a tmpfs here: {exc}"}
        shutil.copytree(model_dir, data_dir, dirs_exist_ok=True)
        database_url = await stack.enter_async_context(fresh_database(args.database_url, work, name))
        direct = resolve_database_url(database_url)
        db_proxy = TcpProxy(direct.host or "127.0.0.1", direct.port or 5432)
        await db_proxy.start()
        stack.push_async_callback(db_proxy.close)
        slack = SlackStandIn()
        await slack.start()
        stack.push_async_callback(slack.close)
        add_customers(slack)
        settings: dict[str, Any] = {
            "slack_bot_token": slack.bot_token,
            "slack_signing_secret": slack.signing_secret,
            "slack_api_url": slack.api_url,
            "database_url": direct.set(host="127.0.0.1", port=db_proxy.port).render_as_string(
                hide_password=False
            ),
            "host": "127.0.0.1",
            "port": free_port(),  # fixed, so a restarted bot answers where Slack delivers
            "triage_retrain_cron": "",
            **card_settings(args),
        }
        classifier_proxy = None
        if name == "classifier":
            token = "faults-" + os.urandom(12).hex()
            server_port = await stack.enter_async_context(
                classifier_server(
                    data_dir, token, args.json.parent / f"{args.json.stem}_classifier_server.log"
                )
            )
            classifier_proxy = TcpProxy("127.0.0.1", server_port)
            await classifier_proxy.start()
            stack.push_async_callback(classifier_proxy.close)
            settings.update(
                classifier_url=f"http://127.0.0.1:{classifier_proxy.port}", classifier_token=token
            )
        print(f"[{name}] starting the bot ...", file=sys.stderr)
        bot = BotProcess()
        await bot.start(settings, data_dir, log_path)
        case = Case(name, args, settings, data_dir, database_url, slack, db_proxy, log_path, bot)
        case.classifier_proxy = classifier_proxy
        stack.push_async_callback(lambda: case.bot.stop())
        model_before = active_fingerprint(data_dir)
        connector = aiohttp.TCPConnector(limit=args.connections, force_close=True)
        session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=SLACK_ACK_TIMEOUT_S)
        )
        stack.push_async_callback(session.close)
        await warm_up(slack, session, case.url(), texts[n:], args.warmup, args.card_channel)

        tracker = ReplyTracker(slack, args.card_channel)
        loop = asyncio.get_running_loop()
        made: list[Delivery] = []
        deliveries: list[asyncio.Task[None]] = []
        t0 = loop.time() + 0.1
        wall0 = time.time() - loop.time() + t0  # epoch time of t0: the stand-in stamps calls with time.time()

        async def inject() -> None:
            await asyncio.sleep(max(0.0, t0 + args.fault_at - loop.time()))
            case.started = loop.time()
            print(f"[{name}] fault at t={case.started - t0:.1f} s", file=sys.stderr)
            await FAULTS[name](case)
            case.finished = loop.time()
            print(f"[{name}] fault over at t={case.finished - t0:.1f} s", file=sys.stderr)

        fault = asyncio.ensure_future(inject())
        print(f"[{name}] sending {n} messages at {args.rate:g}/s ...", file=sys.stderr)
        for i, event in enumerate(events):
            await asyncio.sleep(max(0.0, t0 + event.due - loop.time()))
            message = slack.message_event(event.channel, f"U0C{rng.randrange(5000):05d}", texts[i])
            envelope = slack.event_envelope(message, event_id=f"Ev0FT{i:07d}")
            event.ts, event.body = message["ts"], json.dumps(envelope).encode()
            tracker.by_ts[event.ts] = event
            deliveries.append(
                asyncio.ensure_future(
                    deliver(session, case, event, Delivery(event.due, i, False), args.slack_retries, made)
                )
            )
        await fault
        print(f"[{name}] sent; waiting for Slack's retries and the replies ...", file=sys.stderr)
        deadline = loop.time() + drain_timeout(args, n)
        complete_at, posts = 0.0, -1
        while loop.time() < deadline:
            tracker.update()
            acked = {d.index for d in made if d.status == 200}
            settled = all(task.done() for task in deliveries) and tracker.replied >= len(acked)
            if not settled or tracker.posts != posts:  # backfilled answers may still be coming
                posts = tracker.posts
                complete_at = 0.0
            elif not complete_at:
                complete_at = loop.time()
            elif loop.time() - complete_at >= args.settle:
                break
            await asyncio.sleep(0.5)
        pending = sum(1 for task in deliveries if not task.done())  # Slack would still retry these
        for task in deliveries:
            task.cancel()
        acked = {d.index for d in made if d.status == 200}
        model_after = active_fingerprint(data_dir)
        bot_final = await case.bot.stop()
        tracker.update()
        rows = await count_rows(database_url)
    answered = tracker.replied
    return {
        "case": name,
        "sent": n,
        "acknowledged": len(acked),
        "answered": answered,
        "lost": n - answered,
        "duplicated": sum(max(0, len(e.replies) - 1) for e in events),
        # when each twice-answered message was due and its replies came, in seconds from the start
        "duplicated_detail": [
            {"due_s": round(e.due, 2), "replies_s": [round(t - wall0, 2) for t in e.replies]}
            for e in events
            if len(e.replies) > 1
        ][:20],
        "fault_s": [round(case.started - t0, 1), round(case.finished - t0, 1)],
        "never_acknowledged": n - len(acked),
        "deliveries": len(made),
        # HTTP status (or the client error) of every delivery, first ones and Slack's retries
        "delivery_statuses": dict(Counter(str(d.status) if d.status > 0 else d.error for d in made)),
        "retries_pending_at_end": pending,
        "refused_posts": tracker.failed_posts,
        "active_model_untouched": model_before == model_after,
        "active_model": {"before": model_before, "after": model_after},
        "db": rows,
        "notes": case.notes,
        "bot_log": bot_final.get("log", {}),
        "drain_s": round(loop.time() - (case.finished or t0), 1),
    }


# ---- report --------------------------------------------------------------------------------------------


def report(result: dict[str, Any]) -> str:
    header = (
        f"{'case':<12}{'sent':>7}{'acked':>7}{'answered':>10}{'lost':>6}{'dup':>5}  model untouched  notes"
    )
    lines = [
        f"{result['rate']:g} msg/s for {result['duration_s']:g} s per case, fault at "
        f"t={result['fault_at_s']:g} s; PostgreSQL through a proxy; tiny model; "
        f"{result['cpus']} CPUs ({result['cpu_name'] or '?'}); code {result['code']['sha256']}",
        "",
        header,
    ]
    for r in result["cases"]:
        if "skipped" in r:
            lines.append(f"{r['case']:<12}{'skipped: ' + r['skipped']}")
            continue
        notes = ", ".join(f"{k}={v}" for k, v in r["notes"].items() if k not in ("retrain_summary",))
        lines.append(
            f"{r['case']:<12}{r['sent']:>7}{r['acknowledged']:>7}{r['answered']:>10}{r['lost']:>6}"
            f"{r['duplicated']:>5}  {'yes' if r['active_model_untouched'] else 'NO':<15}  {notes}"
        )
    lines.append("")
    for r in result["cases"]:
        if "skipped" in r:
            continue
        states = ",".join(f"{k}={v}" for k, v in sorted(r["db"]["by_state"].items()))
        ok = r["lost"] == 0 and r["duplicated"] == 0 and r["active_model_untouched"]
        lines.append(
            f"{r['case']}: {'PASS' if ok else 'FAIL'}; database: {states}; {r['deliveries']} deliveries"
        )
        if r["notes"].get("retrain_summary"):
            lines.append(f"    retrain: {str(r['notes']['retrain_summary'])[:200]}")
        for line in r["bot_log"].get("first", [])[:3]:
            lines.append(f"    bot log: {line[:160]}")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.json.parent.mkdir(parents=True, exist_ok=True)  # the logs go beside the JSON
    with tempfile.TemporaryDirectory(prefix="triage-faults-") as tmp:
        work = Path(tmp)
        print("training a tiny model on the starter set ...", file=sys.stderr)
        model_dir = work / "model" / "data"
        version = await asyncio.to_thread(build_model, model_dir)
        cases = []
        for name in args.cases:
            cases.append(await run_case(name, args, model_dir, work))
            r = cases[-1]
            brief = {
                k: v
                for k, v in r.items()
                if k in ("sent", "acknowledged", "answered", "lost", "duplicated", "skipped")
                or k == "active_model_untouched"
            }
            print(f"[{name}] {brief}", file=sys.stderr)
    return {
        "rate": args.rate,
        "duration_s": args.duration,
        "fault_at_s": args.fault_at,
        "slack_retries_s": args.slack_retries,
        "model": f"{version}: tiny BERT, 20 steps on the starter set",
        "cpus": os.cpu_count(),
        "cpu_name": cpu_name(),
        "code": code_fingerprint(),
        "cases": cases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"Comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--rate", type=float, default=50.0, help="Messages per second [50]")
    parser.add_argument("--duration", type=float, default=30.0, help="Seconds of messages per case [30]")
    parser.add_argument("--fault-at", type=float, default=10.0, help="Seconds into the load [10]")
    parser.add_argument("--database-url", default=DEFAULT_PG, help=f"PostgreSQL server [{DEFAULT_PG}]")
    parser.add_argument("--database-outage-s", type=float, default=30.0, help="[30]")
    parser.add_argument("--classifier-outage-s", type=float, default=60.0, help="[60; the issue: 600]")
    parser.add_argument("--storm-s", type=float, default=20.0, help="Seconds of 429 on chat.postMessage [20]")
    parser.add_argument(
        "--disk-headroom-kib", type=int, default=256, help="tmpfs room beyond the active version [256]"
    )
    parser.add_argument(
        "--slack-retries", default="1,60,300", help="Seconds before each redelivery, as Slack [1,60,300]"
    )
    parser.add_argument("--channels", type=int, default=500, help="Customer channels to spread over [500]")
    parser.add_argument("--connections", type=int, default=100, help="Concurrent deliveries at most [100]")
    parser.add_argument("--warmup", type=int, default=5, help="Unmeasured messages first [5]")
    parser.add_argument(
        "--drain-timeout", type=float, default=480.0, help="After the fault, wait this long at most [480]"
    )
    parser.add_argument("--settle", type=float, default=10.0, help="Then this long for duplicates [10]")
    parser.add_argument("--seed", type=int, default=0)
    add_card_channel_argument(parser)
    parser.add_argument("--json", type=Path, default=OUT / "faults.json", help="[bench/out/faults.json]")
    args = parser.parse_args()
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}; known: {', '.join(CASES)}")
    args.slack_retries = [float(s) for s in args.slack_retries.split(",") if s.strip()]
    result = asyncio.run(run(args))
    print(report(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nJSON: {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()

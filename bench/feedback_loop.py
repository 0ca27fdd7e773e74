"""Does the loop learn? Corrections of wrong predictions, retraining every K of them, accuracy after each run.

1. A model is trained on 10 examples per class of BANKING77 (the seed model).
2. The rest of the file arrives as Slack messages through the bot's storage path (message stored,
   classified by the in-process engine, prediction stored); simulated agents correct only wrong predictions.
3. Every K corrections the real retraining path runs (``bot.retrain.run_once``: export, warm-started
   candidate, held-out comparison, gate, promotion, engine hot swap). As in the product, predictions
   nobody corrected count as accepted labels (``--max-accepted 0``: corrections only).
4. After each run: accuracy on held-out BANKING77 rows (the stratified split's test share of the whole
   file, never trained on or fed as messages) and the number of corrections so far. Output: CSV + plot
   in bench/out/.

    .venv/bin/python bench/feedback_loop.py --every 250 --max-corrections 2000

Which labels teach most? ``--strategy uncertainty|random|both``: from the same seed model, each simulated
day ``--arrivals`` messages arrive (stored and classified as above) and agents label ``--per-day`` of
them: the top of the review queue (``bot.review``: margin uncertainty, near-duplicates collapsed) or as
many random unlabeled ones of the queue's window; then the real retraining path runs on the human labels
(``--max-accepted 0`` unless given). Output: held-out accuracy against human labels, both curves on one
plot, and the labels each strategy needed to reach ``--reach`` (target: uncertainty needs at most 60% of
what random needs).

    .venv/bin/python bench/feedback_loop.py --strategy both --days 30 --arrivals 400 --per-day 100
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.retrain import Acceptance, run_once
from bot.review import SCAN_LIMIT, WINDOW, ReviewQueue
from bot.settings import load_settings
from bot.storage import repository as repo
from bot.storage.database import create_db_engine, create_session_factory, upgrade_database
from bot.storage.models import CorrectionKind, CorrectionSource, TrainingTrigger, utcnow
from classifier.client import LocalClassifier
from classifier.data import Example, load_examples, split_examples
from classifier.engine import EngineConfig
from classifier.evaluate import evaluate
from classifier.model import MultiHeadClassifier
from classifier.plots import learning_curve_png
from classifier.registry import Registry
from classifier.schema import LabelSchema
from classifier.train import TrainConfig, train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TARGET = {"accuracy": 0.85, "corrections": 2000}
LABEL_RATIO_TARGET = 0.6  # uncertainty sampling reaches --reach with at most this share of random's labels


def heldout_accuracy(
    registry: Registry, heldout: list[Example], version: str | None = None
) -> tuple[str, float]:
    """Topic accuracy of a version (default: the active one) on the held-out rows."""
    info = registry.get(version) if version else registry.active()
    model, tokenizer, max_length = MultiHeadClassifier.load(Path(info.path))
    report = evaluate(model, tokenizer, heldout, max_length)
    return info.name, report["heads"]["topic"]["accuracy"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=SHARED / "banking77" / "train.csv")
    parser.add_argument("--seed-per-class", type=int, default=10)
    parser.add_argument("--every", type=int, default=250, help="retrain after this many new corrections")
    parser.add_argument("--max-corrections", type=int, default=2000)
    parser.add_argument("--seed-epochs", type=int, default=10)
    parser.add_argument("--retrain-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--head-lr", type=float, default=2e-3)
    parser.add_argument(
        "--class-weighting", default="none", help="none or balanced (retraining inherits the seed's)"
    )
    parser.add_argument(
        "--accept-after-hours",
        type=float,
        default=0.0,
        help="review window (the simulated agents have seen every reply before the next batch)",
    )
    parser.add_argument(
        "--max-accepted",
        type=int,
        default=None,
        help="0: train on human labels only (default 20000; 0 with --strategy uncertainty|random|both)",
    )
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument(
        "--strategy",
        choices=["corrections", "uncertainty", "random", "both"],
        default="corrections",
        help="corrections: agents fix wrong predictions (above); the others: agents label --per-day a day",
    )
    parser.add_argument(
        "--days", type=int, default=30, help="simulated days (--strategy other than corrections)"
    )
    parser.add_argument("--arrivals", type=int, default=400, help="messages arriving per simulated day")
    parser.add_argument("--per-day", type=int, default=100, help="messages the agents label per day")
    parser.add_argument("--reach", type=float, default=0.90, help="held-out accuracy the strategies race to")
    parser.add_argument("--classes", type=int, default=0, help="keep only the first N topics (0: all)")
    parser.add_argument(
        "--base-model", default="", help="local Hugging Face folder (default: the packaged one)"
    )
    args = parser.parse_args()
    if args.max_accepted is None:
        args.max_accepted = 20_000 if args.strategy == "corrections" else 0
    return args


async def main() -> None:
    args = parse_args()

    work = Path(tempfile.mkdtemp(prefix="triage-loop-"))
    os.environ["TRIAGE_DATA_DIR"] = str(work)
    registry = Registry(work / "models")
    examples, schema = await asyncio.to_thread(
        load_examples, [args.data], LabelSchema(heads={"topic": []}), infer_labels=True
    )
    if args.classes:  # a small configuration: the first N topics only
        kept = sorted(schema.heads["topic"])[: args.classes]
        examples = [ex for ex in examples if ex.labels["topic"] in kept]
        schema = LabelSchema(heads={"topic": kept})
    splits = split_examples(examples, heads=["topic"])
    heldout, pool = splits["test"], splits["train"] + splits["validation"]
    rng = random.Random(0)
    rng.shuffle(pool)
    seed: list[Example] = []
    per_class: dict[str, int] = {}
    stream: list[Example] = []
    for ex in pool:
        label = ex.labels["topic"]
        if per_class.get(label, 0) < args.seed_per_class:
            per_class[label] = per_class.get(label, 0) + 1
            seed.append(ex)
        else:
            stream.append(ex)
    print(f"seed {len(seed)} examples, stream {len(stream)} messages, held-out {len(heldout)}", flush=True)

    config = TrainConfig(
        epochs=args.seed_epochs,
        learning_rate=args.lr,
        head_learning_rate=args.head_lr,
        batch_size=16,
        max_length=64,
        patience=3,
        class_weighting=args.class_weighting,
        base_model=args.base_model,
    )
    started = time.time()
    # the held-out rows are never trained on nor sent as messages: the split is stratified over the data it
    # is given, so they cannot ride along with the seed; the gate judges each run on the test share of
    # the seed and the corrections
    train(seed, schema, config, registry, progress=False)
    seed_seconds = time.time() - started
    name, accuracy = heldout_accuracy(registry, heldout)
    rows: list[dict[str, Any]] = [
        {
            "run": 0,
            "corrections": 0,
            "messages": 0,
            "model": name,
            "accuracy": round(accuracy, 4),
            "status": "seed",
            "candidate": name,
            "candidate_accuracy": round(accuracy, 4),
            "retrain_seconds": round(seed_seconds, 1),
            "reasons": "",
        }
    ]
    print(json.dumps(rows[-1]), flush=True)
    if args.strategy != "corrections":
        strategies = ["uncertainty", "random"] if args.strategy == "both" else [args.strategy]
        curves = {}
        for strategy in strategies:
            curves[strategy] = await label_strategy_run(args, strategy, registry, stream, heldout, rows[0])
        write_strategy_report(curves, args.reach, args.out)
        return

    url = args.database_url or f"sqlite+aiosqlite:///{work / 'triage.db'}"
    await upgrade_database(url)
    engine = create_db_engine(url)
    sessions = create_session_factory(engine)
    classifier = LocalClassifier(registry=registry, config=EngineConfig(poll_interval_s=0.5))
    corrections = since_retrain = messages = 0
    batch = 32

    async def retrain() -> None:
        t0 = time.time()
        outcome = await run_once(
            sessions,
            engine,
            registry,
            trigger=TrainingTrigger.CLI,
            epochs=args.retrain_epochs,
            acceptance=Acceptance(after_hours=args.accept_after_hours, max_rows=args.max_accepted),
        )
        seconds = time.time() - t0
        name, accuracy = await asyncio.to_thread(heldout_accuracy, registry, heldout)
        candidate = outcome.candidate
        _, candidate_accuracy = (
            await asyncio.to_thread(heldout_accuracy, registry, heldout, candidate)
            if candidate and candidate != name
            else (name, accuracy)
        )
        rows.append(
            {
                "run": len(rows),
                "corrections": corrections,
                "messages": messages,
                "model": name,
                "accuracy": round(accuracy, 4),
                "status": str(outcome.status),
                "candidate": candidate or "",
                "candidate_accuracy": round(candidate_accuracy, 4),
                "retrain_seconds": round(seconds, 1),
                "reasons": "; ".join(outcome.reasons),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        await asyncio.sleep(1.0)  # let the engine's ACTIVE poller pick up a promotion

    try:
        for start in range(0, len(stream), batch):
            chunk = stream[start : start + batch]
            result = await classifier.classify([e.text for e in chunk])
            async with sessions.begin() as session:
                for i, (ex, r) in enumerate(zip(chunk, result.results, strict=True)):
                    messages += 1
                    message, _ = await repo.store_message(
                        session,
                        team_id="T1",
                        channel_id="C1",
                        ts=f"{1700000000 + start + i}.000100",
                        user_id="U1",
                        text=ex.text,
                    )
                    await repo.add_prediction(session, message.id, result.model_version, r.heads)
                    await repo.mark_classified(session, message.id)
                    predicted = r.heads["topic"].label
                    if predicted != ex.labels["topic"]:  # agents only fix what is wrong
                        await repo.add_correction(
                            session,
                            message.id,
                            "topic",
                            ex.labels["topic"],
                            user_id="U2",
                            source=CorrectionSource.BUTTON,
                            old_label=predicted,
                        )
                        corrections += 1
                        since_retrain += 1
            if since_retrain >= args.every or corrections >= args.max_corrections:
                await retrain()
                since_retrain = 0
            if corrections >= args.max_corrections:
                break
        if since_retrain:  # the stream ran out before the next K: one last run on what came in
            await retrain()
    finally:
        await classifier.close()
        await engine.dispose()

    write_report(rows, corrections, seed_seconds, args.out)


async def label_strategy_run(
    args: argparse.Namespace,
    strategy: str,
    seed_registry: Registry,
    stream: list[Example],
    heldout: list[Example],
    seed_row: dict[str, Any],
) -> list[dict[str, Any]]:
    """Simulated days from a copy of the seed model: arrivals classified and stored, ``--per-day`` of them
    labeled by the agents as ``strategy`` picks them, then a real retraining run. Rows: accuracy by labels."""
    work = Path(tempfile.mkdtemp(prefix=f"triage-{strategy}-"))
    shutil.copytree(seed_registry.root, work / "models")
    registry = Registry(work / "models")
    url = f"sqlite+aiosqlite:///{work / 'triage.db'}"
    await upgrade_database(url)
    engine = create_db_engine(url)
    sessions = create_session_factory(engine)
    classifier = LocalClassifier(registry=registry, config=EngineConfig(poll_interval_s=0.5))
    # the queue's thresholds as the bot has them by default (no Slack is contacted)
    queue = ReviewQueue(
        load_settings(_env_file=None, slack_bot_token="xoxb-bench", slack_signing_secret="x"), sessions
    )
    rng = random.Random(0)
    truth: dict[int, str] = {}
    first_day = utcnow() - timedelta(days=args.days + 1)
    rows = [{**seed_row, "strategy": strategy, "day": 0, "labels": 0}]
    labels = 0
    try:
        for day in range(args.days):
            now = first_day + timedelta(days=day, hours=9)
            arrivals = stream[day * args.arrivals : (day + 1) * args.arrivals]
            if not arrivals:
                break
            await arrive(sessions, classifier, arrivals, now, truth)
            picked = await pick(strategy, queue, sessions, now + timedelta(hours=8), args.per_day, rng)
            await label(sessions, picked, truth, now + timedelta(hours=8))
            labels += len(picked)
            t0 = time.time()
            outcome = await run_once(
                sessions,
                engine,
                registry,
                trigger=TrainingTrigger.CLI,
                epochs=args.retrain_epochs,
                acceptance=Acceptance(after_hours=args.accept_after_hours, max_rows=args.max_accepted),
            )
            seconds = time.time() - t0
            name, accuracy = await asyncio.to_thread(heldout_accuracy, registry, heldout)
            candidate = outcome.candidate
            _, candidate_accuracy = (
                await asyncio.to_thread(heldout_accuracy, registry, heldout, candidate)
                if candidate and candidate != name
                else (name, accuracy)
            )
            rows.append(
                {
                    "strategy": strategy,
                    "day": day + 1,
                    "labels": labels,
                    "model": name,
                    "accuracy": round(accuracy, 4),
                    "status": str(outcome.status),
                    "candidate": candidate or "",
                    "candidate_accuracy": round(candidate_accuracy, 4),
                    "retrain_seconds": round(seconds, 1),
                    "reasons": "; ".join(outcome.reasons),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            await asyncio.sleep(1.0)  # let the engine's ACTIVE poller pick up a promotion
    finally:
        await classifier.close()
        await engine.dispose()
    return rows


async def arrive(
    sessions: Any, classifier: LocalClassifier, arrivals: list[Example], now: datetime, truth: dict[int, str]
) -> None:
    """A day's messages stored and classified as the bot does (``truth``: message id -> the true topic)."""
    for start in range(0, len(arrivals), 32):
        chunk = arrivals[start : start + 32]
        result = await classifier.classify([e.text for e in chunk])
        async with sessions.begin() as session:
            for ex, r in zip(chunk, result.results, strict=True):
                message, _ = await repo.store_message(
                    session,
                    team_id="T1",
                    channel_id="C1",
                    ts=f"{now.timestamp() + len(truth):.6f}",
                    user_id="U1",
                    text=ex.text,
                    received_at=now,
                    now=now,
                )
                await repo.add_prediction(session, message.id, result.model_version, r.heads, now=now)
                await repo.mark_classified(session, message.id)
                truth[message.id] = ex.labels["topic"]


async def pick(
    strategy: str, queue: ReviewQueue, sessions: Any, now: datetime, k: int, rng: random.Random
) -> list[tuple[int, str]]:
    """(message id, predicted topic) of the ``k`` messages the agents label today: the review queue's top
    (``uncertainty``) or random unlabeled messages of the queue's window (``random``)."""
    if strategy == "uncertainty":
        items = (await queue.current(now)).items[:k]
        return [(item.message.id, item.labels["topic"]) for item in items]
    async with sessions() as session:
        candidates = await repo.review_candidates(session, since=now - WINDOW, limit=SCAN_LIMIT)
    unlabeled = [c for c in candidates if not c.labels_by_user]
    chosen = rng.sample(unlabeled, min(k, len(unlabeled)))
    return [(c.message.id, c.prediction.by_head()["topic"].label) for c in chosen]


async def label(sessions: Any, picked: list[tuple[int, str]], truth: dict[int, str], now: datetime) -> None:
    """Each picked message gets its true topic from an agent: a confirmation or a correction."""
    async with sessions.begin() as session:
        for message_id, predicted in picked:
            right = predicted == truth[message_id]
            await repo.add_correction(
                session,
                message_id,
                "topic",
                truth[message_id],
                user_id="U2",
                source=CorrectionSource.BUTTON,
                kind=CorrectionKind.CONFIRMATION if right else CorrectionKind.CORRECTION,
                old_label=predicted,
                now=now,
            )


def labels_to_reach(rows: list[dict[str, Any]], reach: float) -> int | None:
    return next((r["labels"] for r in rows if r["accuracy"] >= reach), None)


def write_strategy_report(curves: dict[str, list[dict[str, Any]]], reach: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = [r for curve in curves.values() for r in curve]
    with open(out / "feedback_strategies.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[-1]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, curve in curves.items():
        ax.plot([r["labels"] for r in curve], [r["accuracy"] for r in curve], marker="o", label=strategy)
    ax.axhline(reach, color="grey", linestyle=":", label=f"{reach:.2f}")
    ax.set_xlabel("human labels")
    ax.set_ylabel("held-out accuracy (BANKING77)")
    ax.set_title("Which labels teach most?")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "feedback_strategies.png", dpi=120)
    plt.close(fig)
    for strategy, curve in curves.items():
        needed = labels_to_reach(curve, reach)
        print(
            f"{strategy}: accuracy {curve[0]['accuracy']:.4f} → {curve[-1]['accuracy']:.4f} with "
            f"{curve[-1]['labels']} labels; {reach:.2f} reached with "
            + (f"{needed} labels" if needed is not None else "— (not reached)")
        )
    if set(curves) == {"uncertainty", "random"}:
        active, random_ = (labels_to_reach(curves[s], reach) for s in ("uncertainty", "random"))
        if active is None or random_ is None:
            print("labels ratio uncertainty/random: n/a (a strategy did not reach the target accuracy)")
            # the best accuracy both reached: how many labels each needed for it
            both = min(max(r["accuracy"] for r in curve) for curve in curves.values())
            needed = {s: labels_to_reach(curves[s], both) for s in ("uncertainty", "random")}
            print(
                f"both reached {both:.4f}: uncertainty with {needed['uncertainty']} labels, "
                f"random with {needed['random']}"
            )
        elif random_ == 0:
            print("labels ratio uncertainty/random: n/a (the seed model reaches it: make the task harder)")
        else:
            ratio = active / random_
            print(f"labels ratio uncertainty/random: {ratio:.2f} (target ≤ {LABEL_RATIO_TARGET})")
    print(f"written: {out / 'feedback_strategies.csv'}, {out / 'feedback_strategies.png'}")


def write_report(rows: list[dict[str, Any]], corrections: int, seed_seconds: float, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "feedback_loop.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    learning_curve_png(
        [r["corrections"] for r in rows],
        [r["accuracy"] for r in rows],
        "corrections so far",
        "held-out accuracy (BANKING77)",
        "Does the loop learn?",
        out / "feedback_loop.png",
        rejected=[(r["corrections"], r["candidate_accuracy"]) for r in rows if r["status"] == "rejected"],
    )
    best = max((r for r in rows if r["corrections"] <= TARGET["corrections"]), key=lambda r: r["accuracy"])
    retrains = [r["retrain_seconds"] for r in rows[1:]]
    print(
        f"\nseed accuracy {rows[0]['accuracy']:.4f} → {rows[-1]['accuracy']:.4f} after {corrections} "
        f"corrections ({rows[-1]['accuracy'] / rows[0]['accuracy']:.2f}x); "
        f"best within {TARGET['corrections']} corrections: "
        f"{best['accuracy']:.4f} (target {TARGET['accuracy']})"
    )
    if retrains:
        print(
            f"retrain time: mean {sum(retrains) / len(retrains):.0f} s, max {max(retrains):.0f} s over "
            f"{len(retrains)} runs; seed training {seed_seconds:.0f} s"
        )
    print(f"written: {out / 'feedback_loop.csv'}, {out / 'feedback_loop.png'}")


if __name__ == "__main__":
    asyncio.run(main())

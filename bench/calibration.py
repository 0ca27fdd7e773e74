"""Calibration benchmark: ECE per head before and after the temperatures fitted at training time.

Trains the default model on BANKING77 (all of the file's training share, or ``--per-class`` examples of
each intent, drawn as bench/feedback_loop.py draws its seed) with the project's own training path, which
fits one temperature per head on the run's validation split. Then judges it on held-out rows (the stable
split's test share of the whole file, never trained on): ECE and mean confidence before and after
scaling (the baseline is the same model's raw softmax, in the same run), and the accuracy of the labels
on each side of TRIAGE_UNSURE_BELOW. Output: a table, JSON and the reliability plots in bench/out/.

    .venv/bin/python bench/calibration.py --per-class 10 --epochs 10    # the few-shot seed model
    .venv/bin/python bench/calibration.py --per-class 0 --device cuda   # full data (GPU advised)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classifier.data import Example, load_examples, split_examples
from classifier.evaluate import evaluate
from classifier.model import MultiHeadClassifier
from classifier.registry import Registry
from classifier.results import UNSURE_BELOW
from classifier.schema import LabelSchema
from classifier.train import TrainConfig, train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TARGETS = {"topic_ece_full_data": 0.02, "topic_ece_10_per_class": 0.10}


def draw_per_class(pool: list[Example], per_class: int) -> list[Example]:
    """``per_class`` examples of each topic from a shuffled pool (as bench/feedback_loop.py's seed)."""
    rng = random.Random(0)
    pool = list(pool)
    rng.shuffle(pool)
    taken: dict[str, int] = {}
    seed = []
    for ex in pool:
        label = ex.labels["topic"]
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            seed.append(ex)
    return seed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=SHARED / "banking77" / "train.csv")
    parser.add_argument("--per-class", type=int, default=10, help="0: the whole training share")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--head-lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--unsure-below", type=float, default=UNSURE_BELOW)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()

    examples, schema = load_examples([args.data], LabelSchema(heads={"topic": []}), infer_labels=True)
    splits = split_examples(examples, heads=["topic"])
    heldout, pool = splits["test"], splits["train"] + splits["validation"]
    training = draw_per_class(pool, args.per_class) if args.per_class else pool
    print(f"training on {len(training)} examples, judged on {len(heldout)} held-out rows", flush=True)

    config = TrainConfig(
        epochs=args.epochs,
        learning_rate=args.lr,
        head_learning_rate=args.head_lr,
        batch_size=args.batch_size,
        max_length=64,
        patience=args.patience,
        device=args.device,
    )
    registry = Registry(Path(tempfile.mkdtemp(prefix="triage-calibration-")) / "models")
    started = time.time()
    result = train(training, schema, config, registry, progress=False)
    train_seconds = time.time() - started
    info = result.version
    model, tokenizer, max_length = MultiHeadClassifier.load(Path(info.path))
    name = f"calibration-{args.per_class or 'all'}-per-class"
    report = evaluate(
        model,
        tokenizer,
        heldout,
        max_length,
        out_dir=args.out / name,
        temperatures=info.temperatures,
        unsure_below=args.unsure_below,
    )
    out: dict[str, Any] = {
        "training_rows": len(training),
        "validation_rows": info.data["splits"]["validation"],
        "heldout_rows": len(heldout),
        "train_seconds": round(train_seconds, 1),
        "epochs_run": len(result.history),
        "config": vars(args) | {"data": str(args.data), "out": str(args.out)},
        "targets": TARGETS,
        "heads": {},
    }
    print("\nhead      n     accuracy  T       ECE before  ECE after  ratio  mean conf before → after")
    for head, m in report["heads"].items():
        ratio = m["ece"] / m["ece_uncalibrated"] if m["ece_uncalibrated"] else float("nan")
        out["heads"][head] = {
            k: m[k]
            for k in (
                "n",
                "accuracy",
                "temperature",
                "ece_uncalibrated",
                "ece",
                "mean_confidence_uncalibrated",
                "mean_confidence",
                "by_confidence",
            )
        } | {"ece_ratio_after_before": round(ratio, 4)}
        print(
            f"{head:<8} {m['n']:>5}  {m['accuracy']:8.4f}  {m['temperature']:6.3f}  "
            f"{m['ece_uncalibrated']:10.4f}  {m['ece']:9.4f}  {ratio:5.3f}  "
            f"{m['mean_confidence_uncalibrated']:.4f} → {m['mean_confidence']:.4f}"
        )
        split = m["by_confidence"]
        print(
            f"  confidence ≥ {split['threshold']:g}: {split['sure_n']} rows, "
            f"accuracy {split['sure_accuracy']}; below: {split['unsure_n']} rows, "
            f"accuracy {split['unsure_accuracy']}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwritten to {path}; reliability plots in {args.out / name}")


if __name__ == "__main__":
    main()

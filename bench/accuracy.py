"""Accuracy benchmark: one joint multi-head model vs single-head models on public data.

Topic head: BANKING77 (77 intents); sentiment head: TweetEval. Each is split with the project's own stable
80/10/10 split, and every model is judged on the same held-out test rows. Prints accuracy, macro-F1,
macro-recall, the joint model's gap to the single-head ones, and training samples/s.

    .venv/bin/python bench/accuracy.py                      # joint + both single-head models, CPU
    .venv/bin/python bench/accuracy.py --speed-only --device cuda --base-model random-bert-base
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classifier.data import load_examples, split_examples
from classifier.evaluate import evaluate
from classifier.model import MultiHeadClassifier
from classifier.registry import Registry
from classifier.schema import LabelSchema
from classifier.train import TrainConfig, train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TARGETS = {"topic_accuracy": 0.92, "sentiment_macro_recall": 0.66, "joint_gap_points": 1.0}


def random_bert_base(directory: Path) -> Path:
    """A bert-base-sized encoder with random weights (speed only) and the packaged tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from classifier.paths import default_base_model

    BertModel(BertConfig()).save_pretrained(directory)
    AutoTokenizer.from_pretrained(default_base_model(), local_files_only=True).save_pretrained(directory)
    return directory


def run(
    name: str, files: list[Path], config: TrainConfig, registry: Registry, test_sets: dict[str, Any]
) -> dict:
    examples, schema = load_examples(
        files, LabelSchema(heads={"topic": [], "sentiment": []}), infer_labels=True
    )
    started = time.time()
    result = train(examples, schema, config, registry, progress=True)
    seconds = time.time() - started
    model, tokenizer, max_length = MultiHeadClassifier.load(Path(result.version.path))
    out: dict[str, Any] = {
        "model": name,
        "version": result.version.name,
        "train_seconds": round(seconds, 1),
        "epochs_run": len(result.history),
        "best_epoch": result.version.data["best_epoch"],
        "train_samples_per_s": round(
            sum(h["samples_per_s"] for h in result.history) / len(result.history), 1
        ),
        "heads": {},
    }
    for head, test in test_sets.items():
        if head not in model.schema.heads:
            continue
        report = evaluate(model, tokenizer, test, max_length, device=None)
        m = report["heads"][head]
        out["heads"][head] = {k: round(m[k], 4) for k in ("n", "accuracy", "macro_f1", "macro_recall")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument(
        "--base-model", default="", help="folder, '' for packaged MiniLM, or random-bert-base"
    )
    parser.add_argument("--models", default="joint,topic,sentiment")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--speed-only", action="store_true", help="a few hundred steps, no accuracy")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "accuracy.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="triage-bench-"))
    base = args.base_model
    if base == "random-bert-base":
        base = str(random_bert_base(work / "bert-base-random"))
    banking, tweets = args.data / "banking77" / "train.csv", args.data / "tweeteval_sentiment" / "train.csv"
    config = dict(
        base_model=base,
        epochs=args.epochs,
        learning_rate=args.lr,
        head_learning_rate=args.head_lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        device=args.device,
        patience=2,
    )
    if args.speed_only:
        config.update(epochs=1, max_steps=200)
    # the held-out rows are the same for every model: the stable split's test part of each file
    test_sets: dict[str, Any] = {}
    for head, path in (("topic", banking), ("sentiment", tweets)):
        examples, _ = load_examples([path], LabelSchema(heads={head: []}), infer_labels=True)
        test_sets[head] = split_examples(examples)["test"]
    files = {"joint": [banking, tweets], "topic": [banking], "sentiment": [tweets]}
    results = []
    for name in args.models.split(","):
        registry = Registry(work / f"registry-{name}")
        results.append(run(name, files[name], TrainConfig(**config), registry, test_sets))
        print(json.dumps(results[-1]), flush=True)

    print("\nmodel       head       n     accuracy  macro-F1  macro-recall  train samples/s")
    for r in results:
        for head, m in r["heads"].items():
            print(
                f"{r['model']:<10}  {head:<9} {m['n']:>5}  {m['accuracy']:8.4f}  {m['macro_f1']:8.4f}  "
                f"{m['macro_recall']:12.4f}  {r['train_samples_per_s']:>10}"
            )
    by_name = {r["model"]: r for r in results}
    summary: dict[str, Any] = {"results": results, "targets": TARGETS}
    if "joint" in by_name:
        joint = by_name["joint"]["heads"]
        for head, metric in (("topic", "accuracy"), ("sentiment", "macro_recall")):
            if head in by_name and head in joint:
                single = by_name[head]["heads"][head][metric]
                gap = (single - joint[head][metric]) * 100
                summary[f"{head}_joint_gap_points"] = round(gap, 2)
                print(
                    f"{head}: joint {metric} {joint[head][metric]:.4f} vs single-head {single:.4f} "
                    f"(gap {gap:+.2f} points; joint/single ratio {joint[head][metric] / single:.3f})"
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()

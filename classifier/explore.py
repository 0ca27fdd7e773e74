"""Data exploration (`triage data inspect`): label distribution, token lengths, truncation at each length."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer

from classifier import plots
from classifier.data import Example, label_counts, load_examples
from classifier.schema import LabelSchema

CUTS = (32, 64, 128, 256, 512)
COVERAGE = 0.95  # suggest the shortest length that keeps this share of texts whole


def token_lengths(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Each text's length in tokens, special tokens included, uncut."""
    return [len(ids) for ids in tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]]


def cut_shares(lengths: Sequence[int]) -> dict[int, float]:
    """The share of texts longer than each of ``CUTS``."""
    arr = np.array(lengths)
    return {cut: float((arr > cut).mean()) for cut in CUTS}


def suggest_max_length(lengths: Sequence[int]) -> int:
    """The shortest of ``CUTS`` that keeps at least ``COVERAGE`` of the texts whole."""
    shares = cut_shares(lengths)
    return next((c for c in CUTS if 1 - shares[c] >= COVERAGE), CUTS[-1])


def inspect_examples(
    examples: Sequence[Example], tokenizer_dir: Path, out_dir: Path, title: str
) -> dict[str, Any]:
    """Write summary.txt, summary.json and PNG plots to ``out_dir``; return the summary."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    lengths = token_lengths(tokenizer, [ex.text for ex in examples])
    arr = np.array(lengths)
    cut_share = cut_shares(lengths)
    suggested = suggest_max_length(lengths)
    counts = label_counts(examples)
    summary: dict[str, Any] = {
        "texts": len(examples),
        "labels": {h: dict(c.most_common()) for h, c in counts.items()},
        "unlabeled": {h: len(examples) - sum(c.values()) for h, c in counts.items()},
        "tokens": {
            "min": int(arr.min()),
            "median": float(np.median(arr)),
            "p95": float(np.percentile(arr, 95)),
            "max": int(arr.max()),
            "mean": float(arr.mean()),
        },
        "cut_share": {str(k): v for k, v in cut_share.items()},
        "suggested_max_length": suggested,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for head, c in counts.items():
        plots.label_distribution_png(c, f"{title}: {head} labels", out_dir / f"labels_{head}.png")
    plots.length_histogram_png(lengths, CUTS, f"{title}: text length in tokens", out_dir / "lengths.png")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out_dir / "summary.txt").write_text(format_summary(summary, title) + "\n", encoding="utf-8")
    return summary


def format_summary(summary: dict[str, Any], title: str) -> str:
    lines = [f"{title}: {summary['texts']} texts"]
    for head, counts in summary["labels"].items():
        total = sum(counts.values())
        lines.append(
            f"\n[{head}] {total} labeled, {summary['unlabeled'][head]} without a label, {len(counts)} labels"
        )
        width = max(len(k) for k in counts)
        lines += [f"  {label:<{width}}  {n:6d}  {n / total:6.1%}" for label, n in counts.items()]
        ratio = max(counts.values()) / max(min(counts.values()), 1)
        if ratio > 10:
            lines.append(
                f"  warning: the largest class is {ratio:.0f}x the smallest; expect weak recall on small ones"
            )
    t = summary["tokens"]
    lines.append(
        f"\ntokens per text: min {t['min']}, median {t['median']:.0f}, p95 {t['p95']:.0f}, max {t['max']}"
    )
    for cut, share in summary["cut_share"].items():
        lines.append(f"  cut at {cut:>3}: {share:6.1%} of texts")
    lines.append(
        f"suggested --max-length: {summary['suggested_max_length']} "
        f"(keeps at least {COVERAGE:.0%} of texts whole)"
    )
    return "\n".join(lines)


def inspect_files(
    paths: Sequence[Path],
    tokenizer_dir: Path,
    out_dir: Path,
    text_column: str = "text",
    schema: LabelSchema | None = None,
) -> dict[str, Any]:
    """Inspect files with any labels (they are discovered, not checked against a schema)."""
    schema = schema or LabelSchema()
    examples, _ = load_examples(paths, schema, text_column=text_column, infer_labels=True)
    return inspect_examples(examples, tokenizer_dir, out_dir, ", ".join(Path(p).name for p in paths))

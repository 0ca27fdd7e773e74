"""Evaluation: per-head metrics, confusion matrices, ROC AUC, calibration, and the wrong predictions.

``evaluate`` returns a JSON-ready report; with ``out_dir`` it also writes the files ``EvalFiles`` names:
``metrics.json``, PNG plots (confusion matrix, reliability diagram, ROC curves) and
``wrong_predictions.csv``.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)
from tqdm import tqdm

from classifier import plots
from classifier.calibration import (
    accuracy_by_confidence,
    calibrate,
    calibration_bins,
    expected_calibration_error,
)
from classifier.data import Example
from classifier.model import MultiHeadClassifier, predict_probs, torch_runner
from classifier.onnx_backend import OnnxModel, load_onnx, resolve_backend
from classifier.registry import EvalFiles, VersionInfo
from classifier.results import UNSURE_BELOW, Backend, Quantize
from classifier.schema import LabelSchema

TOO_FEW_PER_CLASS = 10  # held-out rows a class needs before its scores mean much


def head_metrics(y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Metrics of one head; ``y_true`` holds label indices, ``probs`` the [n, n_labels] distribution."""
    y_pred = probs.argmax(axis=1)
    idx = list(range(len(labels)))
    present = sorted(set(y_true.tolist()))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    # macro over the labels the data has: a label without rows would score 0 and punish (or, predicted
    # nowhere, flatter) a model for classes this data cannot judge; wrong guesses of such a label still
    # cost the true classes their recall
    mp, mr, mf, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=present, average="macro", zero_division=0
    )
    confidence = probs.max(axis=1)
    correct = (y_pred == y_true).astype(float)
    return {
        "n": len(y_true),
        "classes": len(present),
        "min_support": int(min(s[i] for i in present)) if present else 0,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(mf),
        "macro_recall": float(mr),
        "macro_precision": float(mp),
        "per_class": {
            labels[i]: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i in idx
        },
        "confusion_matrix": {
            "labels": list(labels),
            "matrix": confusion_matrix(y_true, y_pred, labels=idx).tolist(),
        },
        "roc_auc": roc_auc(y_true, probs),
        "ece": expected_calibration_error(confidence, correct),
        "mean_confidence": float(confidence.mean()) if len(confidence) else 0.0,
    }


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    """Binary AUC for two-label heads, one-vs-rest macro AUC otherwise (over classes present in the truth)."""
    classes = sorted(set(y_true.tolist()))
    if len(classes) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if probs.shape[1] == 2:
            return float(roc_auc_score(y_true, probs[:, 1]))
        aucs = [roc_auc_score((y_true == c).astype(int), probs[:, c]) for c in classes]
    return float(np.mean(aucs))


def evaluate(
    model: MultiHeadClassifier,
    tokenizer: Any,
    examples: Sequence[Example],
    max_length: int,
    out_dir: Path | None = None,
    model_version: str = "",
    device: torch.device | None = None,
    progress: bool = False,
    with_rows: bool = False,
    onnx: OnnxModel | None = None,
    temperatures: Mapping[str, float] | None = None,
    unsure_below: float = UNSURE_BELOW,
) -> dict[str, Any]:
    """Evaluate every head that has labels in ``examples``; heads absent from the data are left out.

    Metrics are of the probabilities as served: scaled by the version's ``temperatures`` (see
    calibration.py); the ECE before scaling and the accuracy of labels above and below ``unsure_below``
    are reported beside them.

    ``with_rows`` adds each head's per-row true and predicted labels (``rows``), in the order of
    ``examples``, so two models judged on the same rows can be compared pairwise. With ``onnx``, the
    probabilities come from that ONNX Runtime session of the model instead of ``model`` itself."""
    schema: LabelSchema = model.schema
    out = EvalFiles(out_dir) if out_dir is not None else None
    uncalibrated = probabilities(
        model, tokenizer, [ex.text for ex in examples], max_length, device, progress, onnx
    )
    probs = calibrate(uncalibrated, temperatures or {})
    report: dict[str, Any] = {
        "model_version": model_version,
        "rows": len(examples),
        "heads": {},
        "left_out": {},
    }
    wrong: list[dict[str, Any]] = []
    for head, labels in schema.heads.items():
        unknown = _unknown_labels(examples, head, labels)
        if unknown:  # the model cannot predict these labels: judging it on them says nothing
            report["left_out"][head] = unknown
        rows = [i for i, ex in enumerate(examples) if ex.labels.get(head) in labels]
        if not rows:
            continue
        judged = _JudgedHead(
            head,
            labels,
            y_true=np.array([labels.index(examples[i].labels[head]) for i in rows]),
            probs=probs[head][rows],
            raw_confidence=uncalibrated[head][rows].max(axis=1),
        )
        metrics = _head_report(judged, (temperatures or {}).get(head, 1.0), unsure_below, with_rows)
        report["heads"][head] = metrics
        wrong += _wrong_predictions(judged, [examples[i] for i in rows])
        if out is not None:
            _plot_head(judged, metrics, out)
    report["macro_f1_mean"] = mean_macro_f1(report)
    if out is not None:
        _write_report(report, wrong, out)
    return report


@dataclass
class _JudgedHead:
    """One head on the rows labeled for it: the true class ids, the served (calibrated) probabilities, and
    the confidence before calibration."""

    head: str
    labels: Sequence[str]
    y_true: np.ndarray
    probs: np.ndarray
    raw_confidence: np.ndarray

    @property
    def y_pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def correct(self) -> np.ndarray:
        return (self.y_pred == self.y_true).astype(float)


def _unknown_labels(examples: Sequence[Example], head: str, labels: Sequence[str]) -> dict[str, int]:
    """Labels of ``head`` in the data that the model does not know, by count."""
    unknown = Counter(
        ex.labels[head] for ex in examples if head in ex.labels and ex.labels[head] not in labels
    )
    return dict(unknown.most_common())


def _head_report(
    judged: _JudgedHead, temperature: float, unsure_below: float, with_rows: bool
) -> dict[str, Any]:
    """The head's metrics, its calibration before and after scaling, and (``with_rows``) each row's labels."""
    metrics = head_metrics(judged.y_true, judged.probs, judged.labels)
    metrics["temperature"] = temperature
    metrics["ece_uncalibrated"] = expected_calibration_error(judged.raw_confidence, judged.correct)
    metrics["mean_confidence_uncalibrated"] = float(judged.raw_confidence.mean())
    metrics["by_confidence"] = accuracy_by_confidence(judged.probs.max(axis=1), judged.correct, unsure_below)
    if with_rows:
        metrics["rows"] = {
            "true": [judged.labels[t] for t in judged.y_true],
            "predicted": [judged.labels[p] for p in judged.y_pred],
        }
    return metrics


def _wrong_predictions(judged: _JudgedHead, examples: Sequence[Example]) -> list[dict[str, Any]]:
    """The rows (``examples``: those the head was judged on, in order) the head got wrong."""
    labels, y_pred = judged.labels, judged.y_pred
    return [
        {
            "text": ex.text,
            "head": judged.head,
            "true": labels[judged.y_true[k]],
            "predicted": labels[y_pred[k]],
            "confidence": round(float(judged.probs[k].max()), 4),
            "source": ex.source,
        }
        for k, ex in enumerate(examples)
        if y_pred[k] != judged.y_true[k]
    ]


def _plot_head(judged: _JudgedHead, metrics: dict[str, Any], out: EvalFiles) -> None:
    """The head's confusion matrix, reliability diagram (before and after scaling) and ROC curves."""
    head, labels = judged.head, judged.labels
    out.folder.mkdir(parents=True, exist_ok=True)
    plots.confusion_matrix_png(
        np.array(metrics["confusion_matrix"]["matrix"]),
        labels,
        f"{head}: confusion matrix (n={len(judged.y_true)})",
        out.confusion_png(head),
    )
    plots.reliability_png(
        calibration_bins(judged.probs.max(axis=1), judged.correct),
        f"{head}: reliability (ECE {metrics['ece_uncalibrated']:.3f} → {metrics['ece']:.3f}, "
        f"T={metrics['temperature']:.2f})",
        out.reliability_png(head),
        uncalibrated=calibration_bins(judged.raw_confidence, judged.correct),
    )
    curves = _roc_curves(judged.y_true, judged.probs, labels)
    if curves:
        plots.roc_png(curves, f"{head}: ROC (AUC {metrics['roc_auc']:.3f})", out.roc_png(head))


def _write_report(report: dict[str, Any], wrong: list[dict[str, Any]], out: EvalFiles) -> None:
    """metrics.json, and the wrong predictions as CSV, most confident first."""
    out.folder.mkdir(parents=True, exist_ok=True)
    out.metrics.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    with open(out.wrong_predictions, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["head", "true", "predicted", "confidence", "text", "source"])
        writer.writeheader()
        writer.writerows(sorted(wrong, key=lambda w: -w["confidence"]))


def probabilities(
    model: MultiHeadClassifier,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    device: torch.device | None = None,
    progress: bool = False,
    onnx: OnnxModel | None = None,
) -> dict[str, np.ndarray]:
    """Each head's class probabilities for ``texts``, computed as the engine serves them (see
    ``model.predict_probs``): by ``onnx`` if given, else by ``model`` on ``device`` (default: where it is),
    in eval mode for the time (training calls this between epochs)."""
    device = torch.device("cpu") if onnx is not None else device or next(model.parameters()).device
    runner = onnx if onnx is not None else torch_runner(model, device)
    chunks = [texts[i : i + 1024] for i in range(0, len(texts), 1024)] or [[]]
    was_training = model.training
    model.eval()
    try:
        parts = [
            predict_probs(runner, model.schema, tokenizer, chunk, max_length, device)
            for chunk in tqdm(
                chunks, desc="evaluating", unit="chunk", disable=not progress or len(chunks) < 2
            )
        ]
    finally:
        model.train(was_training)
    return {h: np.concatenate([p[h] for p in parts]) for h in model.schema.heads}


def evaluate_version(
    info: VersionInfo,
    examples: Sequence[Example],
    backend: Backend = "torch",
    quantize: Quantize = "auto",
    **options: Any,
) -> dict[str, Any]:
    """Evaluate a registry version on the CPU as ``backend`` serves it there (``auto``: onnx); ``options``
    go to ``evaluate``. The onnx backend makes the version's ONNX files first if they are missing."""
    model, tokenizer, max_length = MultiHeadClassifier.load(Path(info.path))
    onnx = None
    if resolve_backend(backend, quantize, torch.device("cpu")) == "onnx":
        onnx = load_onnx(info, quantize)
    return evaluate(
        model,
        tokenizer,
        examples,
        max_length,
        model_version=info.name,
        onnx=onnx,
        temperatures=info.temperatures,
        **options,
    )


def _roc_curves(
    y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str]
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    curves = []
    for c in sorted(set(y_true.tolist())):
        positives = (y_true == c).astype(int)
        if 0 < positives.sum() < len(positives):
            fpr, tpr, _ = roc_curve(positives, probs[:, c])
            curves.append((labels[c], fpr, tpr))
    if len(labels) == 2:
        curves = curves[1:]
    return curves


def mean_macro_f1(report: dict[str, Any]) -> float:
    """The single number used for early stopping and checkpoint selection: macro-F1 averaged over heads."""
    heads = report.get("heads", {})
    return float(np.mean([h["macro_f1"] for h in heads.values()])) if heads else 0.0


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The short form kept in version.json and printed by `--json`."""
    keys = (
        "n",
        "classes",
        "min_support",
        "accuracy",
        "macro_f1",
        "macro_recall",
        "roc_auc",
        "ece",
        "ece_uncalibrated",
        "temperature",
    )
    return {
        "model_version": report.get("model_version", ""),
        "heads": {h: {k: m[k] for k in keys if k in m} for h, m in report.get("heads", {}).items()},
    }


def too_few_rows(metrics: dict[str, Any]) -> str | None:
    """A warning when a head's scores rest on too few rows per class to judge it, else ``None``."""
    fewest = metrics.get("min_support")
    if fewest is None or fewest >= TOO_FEW_PER_CLASS:
        return None
    return (
        f"too few rows to judge: {metrics['n']} in all, {fewest} in the smallest of {metrics['classes']} "
        f"classes (under {TOO_FEW_PER_CLASS} per class, one row more or less swings these scores)"
    )


def format_report(report: dict[str, Any]) -> str:
    """Human-readable report: per head, what the figures rest on, overall metrics, then per class."""
    lines = [f"model {report.get('model_version') or '?'}"]
    left_out = report.get("left_out", {})
    for head, m in report["heads"].items():
        auc = f"{m['roc_auc']:.3f}" if m["roc_auc"] is not None else "n/a"
        lines.append(
            f"\n[{head}] n={m['n']} accuracy={m['accuracy']:.3f} macro-F1={m['macro_f1']:.3f} "
            f"macro-recall={m['macro_recall']:.3f} ROC-AUC={auc} ECE={m['ece']:.3f}"
        )
        if "ece_uncalibrated" in m:
            lines.append(f"  {_calibration_line(m)}")
        if head in left_out:
            lines.append(f"  {_left_out_line(left_out[head])}")
        if warning := too_few_rows(m):
            lines.append(f"  warning: {warning}")
        present = {label: c for label, c in m["per_class"].items() if c["support"]}
        width = max(len(label) for label in present)
        lines.append(f"  {'label':<{width}}  precision  recall     f1  support")
        for label, c in present.items():
            lines.append(
                f"  {label:<{width}}  {c['precision']:9.3f}  {c['recall']:6.3f}  {c['f1']:5.3f}  "
                f"{c['support']:7d}"
            )
        absent = [label for label in m["per_class"] if label not in present]
        if absent:
            lines.append(f"  no rows here, left out of the averages: {', '.join(absent)}")
    for head, unknown in left_out.items():
        if head not in report["heads"]:
            lines.append(f"\n[{head}] not evaluated: {_left_out_line(unknown)}")
    return "\n".join(lines)


def _calibration_line(metrics: dict[str, Any]) -> str:
    """Calibration before and after the version's temperature, and what the unsure threshold separates."""
    split = metrics["by_confidence"]

    def share(name: str) -> str:
        accuracy = split[f"{name}_accuracy"]
        return f"{split[f'{name}_n']} rows" + (f", accuracy {accuracy:.3f}" if accuracy is not None else "")

    return (
        f"calibration: temperature {metrics['temperature']:.3f}, ECE {metrics['ece_uncalibrated']:.3f} "
        f"before → {metrics['ece']:.3f} after, mean confidence {metrics['mean_confidence_uncalibrated']:.3f} "
        f"→ {metrics['mean_confidence']:.3f}; confidence ≥ {split['threshold']:g}: {share('sure')}; "
        f"below: {share('unsure')}"
    )


def _left_out_line(unknown: dict[str, int]) -> str:
    labels = ", ".join(f"{label} {n}" for label, n in unknown.items())
    return f"{sum(unknown.values())} row(s) left out: labels this model does not know ({labels})"

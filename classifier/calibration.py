"""Calibrated confidence: one temperature per head, fitted on the validation split (temperature scaling,
Guo et al. 2017), and the expected calibration error (ECE) that judges it.

A head's served probabilities are ``softmax(logits / T)``. Softmax ignores a constant shift of its
input and ``log p = logits - logsumexp(logits)``, so the same transform on probabilities is
``softmax(log p / T)``: every backend (PyTorch, ONNX fp32 or int8) keeps returning plain probabilities,
ONNX files made before a version had a temperature stay valid, and ``calibrate`` is the one step that
turns any of them into what the engine serves and evaluation judges. ``T > 1`` softens an over-confident
head, ``T < 1`` sharpens an under-confident one (a model fine-tuned on a few examples per class); the
argmax, and so accuracy, never changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from classifier.data import Example
from classifier.schema import LabelSchema

ECE_BINS = 15
# Fewer labeled validation rows than this and the fitted temperature is noise: the head keeps T = 1.
MIN_FIT_ROWS = 20
# All validation rows right (or wrong) drive the NLL's optimum to T -> 0 (or infinity); these bounds keep
# a tiny validation split from turning every answer into 100% (or 1/k).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
_TINY = float(np.finfo(np.float32).tiny)  # log(0) guard: a probability that underflowed in float32


def calibrate(probs: Mapping[str, np.ndarray], temperatures: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Each head's probabilities ([rows, labels]) scaled by its temperature (absent: 1, unchanged)."""
    return {head: _scale(p, temperatures.get(head, 1.0)) for head, p in probs.items()}


def _scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    if temperature == 1.0 or probs.size == 0:
        return probs
    logits = np.log(np.maximum(probs.astype(np.float64), _TINY)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=-1, keepdims=True)).astype(probs.dtype)


def fit_temperature(probs: np.ndarray, truth: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of ``truth`` (label indices) under
    ``probs`` ([rows, labels]): LBFGS on log T, so T stays positive."""
    log_probs = torch.from_numpy(np.log(np.maximum(probs.astype(np.float64), _TINY)))
    targets = torch.from_numpy(truth.astype(np.int64))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(log_probs / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(nll)
    fitted = float(log_t.detach().exp())
    return float(np.clip(fitted, MIN_TEMPERATURE, MAX_TEMPERATURE)) if np.isfinite(fitted) else 1.0


def fit_temperatures(
    schema: LabelSchema, examples: Sequence[Example], probs: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """One temperature per head from held-out ``examples`` and the model's (uncalibrated) ``probs`` for
    them; a head with fewer than ``MIN_FIT_ROWS`` labeled rows gets 1."""
    temperatures = {}
    for head, labels in schema.heads.items():
        rows = [i for i, ex in enumerate(examples) if ex.labels.get(head) in labels]
        if len(rows) < MIN_FIT_ROWS:
            temperatures[head] = 1.0
            continue
        truth = np.array([labels.index(examples[i].labels[head]) for i in rows])
        temperatures[head] = round(fit_temperature(probs[head][rows], truth), 4)
    return temperatures


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Equal-width confidence bins: rows, mean confidence and accuracy of each non-empty one."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for lo, hi in itertools.pairwise(edges):
        mask = (confidence > lo) & (confidence <= hi)
        if mask.any():
            out.append(
                {
                    "lo": float(lo),
                    "hi": float(hi),
                    "n": int(mask.sum()),
                    "confidence": float(confidence[mask].mean()),
                    "accuracy": float(correct[mask].mean()),
                }
            )
    return out


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Row-weighted mean gap between confidence and accuracy over the bins."""
    n = len(confidence)
    if n == 0:
        return 0.0
    return float(
        sum(
            b["n"] / n * abs(b["accuracy"] - b["confidence"])
            for b in calibration_bins(confidence, correct, bins)
        )
    )


def accuracy_by_confidence(
    confidence: np.ndarray, correct: np.ndarray, threshold: float
) -> dict[str, float | None]:
    """Rows and accuracy of the labels at or above ``threshold`` ("sure") and below it ("unsure"): what a
    confidence threshold such as TRIAGE_UNSURE_BELOW separates."""
    sure = confidence >= threshold
    out: dict[str, float | None] = {"threshold": threshold}
    for name, mask in (("sure", sure), ("unsure", ~sure)):
        out[f"{name}_n"] = int(mask.sum())
        out[f"{name}_accuracy"] = float(correct[mask].mean()) if mask.any() else None
    return out

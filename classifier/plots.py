"""PNG pictures of results people look at: confusion matrices, reliability, ROC, label and length plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt
import numpy as np


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_matrix_png(matrix: np.ndarray, labels: Sequence[str], title: str, path: Path) -> None:
    """Row-normalised colours (recall per true class) with raw counts written in the cells."""
    n = len(labels)
    size = min(4 + 0.35 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=60 if n > 6 else 30, ha="right", fontsize=8 if n < 30 else 5)
    ax.set_yticks(range(n), labels, fontsize=8 if n < 30 else 5)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        str(matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    _save(fig, path)


def reliability_png(
    bins: Sequence[Mapping[str, float]],
    title: str,
    path: Path,
    uncalibrated: Sequence[Mapping[str, float]] = (),
) -> None:
    """Accuracy per confidence bin; with ``uncalibrated`` bins, those before temperature scaling beside."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    if uncalibrated:
        ax.plot(
            [b["confidence"] for b in uncalibrated],
            [b["accuracy"] for b in uncalibrated],
            "o-",
            color="tab:orange",
            markersize=4,
            label="before temperature scaling",
        )
    if bins:
        ax.bar(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            width=0.05,
            alpha=0.7,
            label="accuracy per confidence bin" + (" (calibrated)" if uncalibrated else ""),
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right")  # an under-confident model's curve runs through the upper left
    _save(fig, path)


def roc_png(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label, fpr, tpr in curves[:20]:  # beyond 20 classes the picture is unreadable
        ax.plot(fpr, tpr, label=label, linewidth=1)
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    if len(curves) <= 12:
        ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def label_distribution_png(counts: Mapping[str, int], title: str, path: Path) -> None:
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.22 * len(items) + 1)))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#4c72b0")
    ax.set_xlabel("examples")
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=8 if len(items) < 30 else 5)
    _save(fig, path)


def length_histogram_png(lengths: Sequence[int], cuts: Sequence[int], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=min(60, max(10, len(set(lengths)))), color="#55a868")
    for cut in cuts:
        if cut <= max(lengths, default=0) * 1.2:
            ax.axvline(cut, color="grey", linestyle="--", linewidth=0.8)
            ax.text(cut, ax.get_ylim()[1] * 0.95, f" {cut}", fontsize=7, color="grey")
    ax.set_xlabel("length in tokens")
    ax.set_ylabel("texts")
    ax.set_title(title)
    _save(fig, path)


def learning_curve_png(
    xs: Sequence[float],
    ys: Sequence[float],
    xlabel: str,
    ylabel: str,
    title: str,
    path: Path,
    rejected: Sequence[tuple[float, float]] = (),
) -> None:
    """A metric against effort; ``rejected`` points (x, candidate's value) are drawn as red crosses."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, marker="o", label="active model")
    if rejected:
        rx, ry = zip(*rejected, strict=True)
        ax.scatter(rx, ry, marker="x", color="tab:red", zorder=3, label="rejected candidate")
        ax.legend(loc="best")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)

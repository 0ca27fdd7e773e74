"""Promotion: train a candidate warm-started from the active version, judge both on the same held-out rows,
and let the ``Gate`` decide which one stays active.

No database and no Slack here: the bot (``bot.retrain``) assembles the examples, keeps the run's record
and relays the progress; this module is the model-side part of a run, in the run's own process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from classifier.data import Example
from classifier.registry import ModelStatus, Registry, VersionInfo
from classifier.results import DEFAULT_BACKEND, DEFAULT_QUANTIZE, Backend, Quantize

ProgressSink = Callable[[dict[str, Any]], None]  # progress events: {"event": "epoch"|"evaluating", ...}


@dataclass
class Gate:
    """Promotion rule: no head's macro-F1 worse by more than ``tolerance``, at least one head better by more
    than ``min_gain``, and no class (with ``min_support`` held-out rows) whose recall falls by more than
    ``max_recall_drop`` *and* whose fall is beyond chance.

    Both models are judged on the same rows, so a class's fall is tested pairwise (an exact one-sided
    McNemar test over the rows one model gets right and the other wrong, level ``recall_drop_alpha``).
    With a dozen held-out rows per class, two rows flipping is a 0.15 recall swing that means nothing;
    seven rows lost and none gained is a regression.
    """

    tolerance: float = 0.01
    min_gain: float = 0.0
    max_recall_drop: float = 0.10
    min_support: int = 5
    recall_drop_alpha: float = 0.05
    # both models are judged on the backend that will serve them (CLASSIFIER_BACKEND/QUANTIZE, on the CPU)
    backend: Backend = DEFAULT_BACKEND
    quantize: Quantize = DEFAULT_QUANTIZE

    def decide(self, candidate: dict[str, Any], incumbent: dict[str, Any]) -> tuple[bool, list[str]]:
        reasons: list[str] = []
        better = []
        heads = [h for h in candidate["heads"] if h in incumbent["heads"]]
        if not heads:
            return False, ["no head has held-out labels to compare on"]
        for head in heads:
            c, i = candidate["heads"][head], incumbent["heads"][head]
            delta = c["macro_f1"] - i["macro_f1"]
            if delta < -self.tolerance:
                reasons.append(f"{head} macro-F1 fell {-delta:.3f} (tolerance {self.tolerance:.3f})")
            if delta > self.min_gain:
                better.append(head)
            flips = _paired_flips(c.get("rows"), i.get("rows"))
            for label, ci in c["per_class"].items():
                ii = i["per_class"].get(label)
                if not ii or ii["support"] < self.min_support:
                    continue
                drop = ii["recall"] - ci["recall"]
                if drop <= self.max_recall_drop:
                    continue
                # without per-row predictions, assume the fewest flips that explain the drop
                lost, gained = flips.get(label, (round(drop * ii["support"]), 0))
                p = _one_sided_sign_test(lost, gained)
                if p < self.recall_drop_alpha:
                    reasons.append(
                        f"{head}={label} recall fell {drop:.2f} (limit {self.max_recall_drop:.2f}; "
                        f"{lost} held-out rows lost, {gained} gained, p={p:.3f})"
                    )
        if not better:
            reasons.append("not better than the incumbent on any head")
        return not reasons, reasons


def _paired_flips(
    candidate_rows: dict[str, list[str]] | None, incumbent_rows: dict[str, list[str]] | None
) -> dict[str, tuple[int, int]]:
    """Per true label: (rows the incumbent got right and the candidate wrong, the reverse)."""
    if not candidate_rows or not incumbent_rows or candidate_rows["true"] != incumbent_rows["true"]:
        return {}
    flips: dict[str, list[int]] = {}
    for truth, cand, inc in zip(
        candidate_rows["true"], candidate_rows["predicted"], incumbent_rows["predicted"], strict=True
    ):
        counts = flips.setdefault(truth, [0, 0])
        counts[0] += inc == truth and cand != truth
        counts[1] += cand == truth and inc != truth
    return {label: (lost, gained) for label, (lost, gained) in flips.items()}


def _one_sided_sign_test(lost: int, gained: int) -> float:
    """P(at least ``lost`` of the ``lost + gained`` flipped rows went against the candidate | no change)."""
    n = lost + gained
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(lost, n + 1)) / 2**n


@dataclass
class Judgement:
    """What the gate decided about a candidate, and the figures it decided on."""

    candidate: str
    incumbent: str
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    # per head: macro-F1 and accuracy of both, and the macro-F1 delta
    deltas: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion_png: str | None = None  # the candidate's held-out confusion matrix (first head)


def heldout_rows(active: VersionInfo, examples: Sequence[Example]) -> list[Example]:
    """The rows both models are judged on: the test share of ``active``'s split of ``examples``, as
    ``train()`` splits them for a candidate warm-started from it (so the candidate never trains on them)."""
    return active.split(examples)["test"]


def train_and_judge(
    registry: Registry,
    active: VersionInfo,
    examples: list[Example],
    gate: Gate,
    *,
    epochs: int | None = None,
    emit: ProgressSink = lambda _: None,
) -> Judgement:
    """Train a candidate from ``active`` on ``examples``, judge both on the held-out rows, and record the
    decision in the registry: the candidate becomes active, or is kept as rejected. Blocking (training);
    each epoch and the start of judging go to ``emit``."""
    from classifier.schema import LabelSchema
    from classifier.train import train

    heldout = heldout_rows(active, examples)
    if not heldout:
        raise ValueError(
            "no held-out rows to judge a candidate on (the active model was trained without a test split)"
        )
    candidate = train(
        examples,
        LabelSchema.from_dict(active.schema),
        _warm_start_config(active, epochs),
        registry,
        data_info={"retrain_of": active.name},
        activate_if_first=False,
        progress=False,
        on_progress=lambda epoch: emit({"event": "epoch", **epoch}),
    ).version
    emit({"event": "evaluating", "candidate": candidate.name})
    judgement = judge(registry, candidate, active, heldout, gate)
    if judgement.promoted:
        registry.activate(candidate.name, reason=f"promoted over {active.name} by the gate")
    else:
        registry.set_status(candidate.name, ModelStatus.REJECTED, "; ".join(judgement.reasons))
    return judgement


def _warm_start_config(active: VersionInfo, epochs: int | None) -> Any:
    """``active``'s own training settings and split, continuing from its weights."""
    from classifier.train_config import TrainConfig

    config_raw = {k: v for k, v in active.train_config.items() if k in TrainConfig.__dataclass_fields__}
    fractions, salt = active.split_config()
    config = TrainConfig(**{**config_raw, "split": fractions, "split_salt": salt})
    config.init_from = active.name
    config.max_steps = None
    if epochs:
        config.epochs = epochs
    return config


def judge(
    registry: Registry, candidate: VersionInfo, incumbent: VersionInfo, heldout: list[Example], gate: Gate
) -> Judgement:
    """Evaluate both versions on ``heldout`` as the gate's backend serves them; the gate's decision."""
    from classifier.evaluate import evaluate_version

    reports = {}
    for name in (candidate.name, incumbent.name):
        out = candidate.files.heldout_eval(None if name == candidate.name else name).folder
        reports[name] = evaluate_version(
            registry.get(name), heldout, gate.backend, gate.quantize, out_dir=out, with_rows=True
        )
    cand, inc = reports[candidate.name]["heads"], reports[incumbent.name]["heads"]
    promote, reasons = gate.decide(reports[candidate.name], reports[incumbent.name])
    deltas = {
        h: {
            "candidate": m["macro_f1"],
            "incumbent": inc[h]["macro_f1"],
            "delta": m["macro_f1"] - inc[h]["macro_f1"],
            "candidate_accuracy": m["accuracy"],
            "incumbent_accuracy": inc[h]["accuracy"],
        }
        for h, m in cand.items()
        if h in inc
    }
    first_head = next(iter(cand), None)
    png = candidate.files.heldout_eval().confusion_png(first_head) if first_head else None
    return Judgement(
        candidate=candidate.name,
        incumbent=incumbent.name,
        promoted=promote,
        reasons=reasons,
        deltas=deltas,
        confusion_png=str(png) if png and png.is_file() else None,
    )

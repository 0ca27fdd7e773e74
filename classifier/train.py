"""Fine-tuning: examples → stable split → tokenize → train with early stopping → evaluate → registry version.

Reads top to bottom like Hugging Face's ``run_classification.py``: settings in a dataclass, then the steps.
Partially labeled rows are fine: a head's loss ignores rows without a label for that head (masked loss).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm
from transformers import BatchEncoding, get_linear_schedule_with_warmup

from classifier.calibration import fit_temperatures
from classifier.data import Example, label_counts, split_examples, write_jsonl
from classifier.evaluate import evaluate, mean_macro_f1, probabilities, summary
from classifier.model import MultiHeadClassifier, autocast_context, resolve_device
from classifier.neighbors import save_training_embeddings
from classifier.paths import default_base_model, runs_log
from classifier.registry import ModelStatus, Registry, VersionFiles, VersionInfo
from classifier.schema import LabelSchema
from classifier.train_config import TrainConfig

IGNORE = -100  # label index of "no label for this head"; skipped by the loss
ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    version: VersionInfo
    report: dict[str, Any]  # full evaluation of the best checkpoint on the test split
    history: list[dict[str, Any]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def merge_schema(base: LabelSchema, data: LabelSchema) -> LabelSchema:
    """Heads and labels of a warm-start parent plus any the new data brings (parent order kept)."""
    heads = {h: list(v) for h, v in base.heads.items()}
    for head, labels in data.heads.items():
        heads.setdefault(head, [])
        heads[head] += [label for label in labels if label not in heads[head]]
    return LabelSchema(heads=heads, allow_new_labels=base.allow_new_labels or data.allow_new_labels)


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random, mega: int = 50
) -> list[list[int]]:
    """Shuffle, then sort by length inside mega-batches of ``mega * batch_size``: batches of similar
    lengths (little padding) in random order (little bias)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    for start in range(0, len(order), mega * batch_size):
        chunk = sorted(order[start : start + mega * batch_size], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def balanced_class_weights(label_ids: torch.Tensor, num_labels: int) -> torch.Tensor:
    """scikit-learn's "balanced" weights, ``n / (k * n_c)``, for each of the ``k`` classes present; 1 for
    absent ones, which have no rows to weigh."""
    labeled = label_ids[label_ids != IGNORE].cpu().numpy()
    weights = torch.ones(num_labels)
    if labeled.size:
        present = np.unique(labeled)
        balanced = compute_class_weight("balanced", classes=present, y=labeled)
        weights[present] = torch.from_numpy(balanced).float()
    return weights


def masked_loss(
    logits: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    class_weights: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean over heads of each head's (optionally class-weighted) cross-entropy on the rows labeled for it."""
    weights = class_weights or {}
    losses = [
        nn.functional.cross_entropy(logits[h], y, weight=weights.get(h), ignore_index=IGNORE)
        for h, y in labels.items()
        if bool((y != IGNORE).any())
    ]
    if not losses:
        return next(iter(logits.values())).sum() * 0.0
    return torch.stack(losses).mean()


def _max_length(
    config: TrainConfig, model: MultiHeadClassifier, tokenizer: Any, train_set: Sequence[Example], say: bool
) -> int:
    """The max length to train with: the configured one, or for "auto" the one `triage data inspect`
    suggests from the training texts; a fixed length that cuts many texts is pointed out."""
    from classifier.explore import COVERAGE, suggest_max_length, token_lengths

    lengths = token_lengths(tokenizer, [ex.text for ex in train_set])
    suggested = suggest_max_length(lengths)
    limit = int(getattr(model.encoder.config, "max_position_embeddings", 512))
    if config.max_length == "auto":
        chosen = min(suggested, limit)
        if say:
            tqdm.write(f"max length {chosen} tokens (auto: keeps {COVERAGE:.0%} of the training texts whole)")
        return chosen
    assert isinstance(config.max_length, int)
    if config.max_length > limit:
        raise ValueError(f"max length {config.max_length} exceeds the model's {limit} positions")
    cut = sum(n > config.max_length for n in lengths) / max(len(lengths), 1)
    if say and cut > 1 - COVERAGE and suggested > config.max_length:
        tqdm.write(
            f"note: {cut:.0%} of the training texts are longer than {config.max_length} tokens and are cut; "
            f"--max-length auto would use {min(suggested, limit)}"
        )
    return config.max_length


def _log_run(record: dict[str, Any]) -> None:
    with open(runs_log(), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


@dataclass
class _Start:
    """The model training starts from, with its tokenizer and the schema it will learn."""

    model: MultiHeadClassifier
    tokenizer: Any
    schema: LabelSchema
    base_name: str  # the base checkpoint, recorded with the version


@dataclass
class _Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]

    @property
    def for_selection(self) -> list[Example]:
        """Where the best epoch is chosen (and temperatures fitted): validation, else the training rows."""
        return self.validation or self.train

    @property
    def reported(self) -> str:
        """The split the version's report is measured on: test, else the next one that has rows."""
        return "test" if self.test else ("validation" if self.validation else "train")

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


@dataclass
class _Encoded:
    """The training split tokenized once, without padding (each batch is padded on its own), and each
    head's label ids (``IGNORE`` where a row has no label for the head)."""

    encoding: BatchEncoding
    lengths: list[int]
    label_ids: dict[str, torch.Tensor]
    class_weights: dict[str, torch.Tensor] | None


@dataclass
class _Progress:
    """Where a run stands: optimizer steps so far, the best epoch (its weights, on the CPU) and each epoch's
    record."""

    run_id: str
    started: float
    step: int = 0
    best_score: float = -1.0
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    stale: int = 0  # epochs since the last gain
    history: list[dict[str, Any]] = field(default_factory=list)


def train(
    examples: Sequence[Example],
    schema: LabelSchema,
    config: TrainConfig,
    registry: Registry,
    data_info: dict[str, Any] | None = None,
    activate_if_first: bool = True,
    progress: bool = True,
    on_progress: ProgressFn | None = None,
) -> TrainResult:
    """Train a model and save it as a new registry version (``candidate``; the first one is activated)."""
    config.validate()
    schema.validate_trainable()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    run = _Progress(run_id=uuid.uuid4().hex[:12], started=time.time())

    start = _starting_model(config, schema, registry)
    start.model.to(device)
    splits = _split(examples, config, start.schema)
    config = replace(
        config, max_length=_max_length(config, start.model, start.tokenizer, splits.train, progress)
    )
    encoded = _encode(splits.train, start, config, device)
    optimizer, scheduler = _optimizer(start.model, config, len(splits.train))
    _log_run(
        {
            "event": "start",
            "time": run.started,
            "run_id": run.run_id,
            "config": asdict(config),
            "schema": start.schema.to_dict(),
            "device": str(device),
            "examples": splits.sizes(),
        }
    )
    _fit(start, encoded, splits, config, optimizer, scheduler, device, run, progress, on_progress)

    assert run.best_state is not None
    start.model.load_state_dict(run.best_state)
    start.model.eval()
    version, report = _save_version(
        start, examples, splits, config, registry, run, device, data_info, activate_if_first, progress
    )
    _log_run(
        {
            "event": "end",
            "run_id": run.run_id,
            "version": version.name,
            "seconds": time.time() - run.started,
            "best_epoch": run.best_epoch,
            "test": summary(report)["heads"],
        }
    )
    return TrainResult(version=version, report=report, history=run.history)


def _starting_model(config: TrainConfig, schema: LabelSchema, registry: Registry) -> _Start:
    """Fresh on the base checkpoint, or warm-started from a registry version (whose heads and labels the
    new schema keeps)."""
    if not config.init_from:
        base_path = Path(config.base_model) if config.base_model else default_base_model()
        model, tokenizer = MultiHeadClassifier.from_base(
            base_path, schema, pooling=config.pooling, dropout=config.dropout
        )
        return _Start(model, tokenizer, schema, str(base_path))
    parent_info = registry.get(config.init_from)
    parent_dir = Path(parent_info.path)
    parent, _, _ = MultiHeadClassifier.load(parent_dir)
    schema = merge_schema(parent.schema, schema)
    model, tokenizer = MultiHeadClassifier.from_base(
        parent_dir / "encoder",
        schema,
        pooling=parent.pooling,
        dropout=config.dropout,
        tokenizer_dir=parent_dir / "tokenizer",
    )
    model.warm_start_from(parent)  # heads, label by label
    return _Start(model, tokenizer, schema, parent_info.base_model)


def _split(examples: Sequence[Example], config: TrainConfig, schema: LabelSchema) -> _Splits:
    """Stratified by the first head's label, ranked by text hash within each class, so a test text stays a
    test text in later runs (as far as the class cuts allow)."""
    splits = split_examples(examples, config.split, config.split_salt, heads=list(schema.heads))
    if not splits["train"]:
        raise ValueError("no training examples after the split; add data")
    return _Splits(splits["train"], splits["validation"], splits["test"])


def _encode(
    train_set: Sequence[Example], start: _Start, config: TrainConfig, device: torch.device
) -> _Encoded:
    encoding = start.tokenizer([ex.text for ex in train_set], truncation=True, max_length=config.max_length)
    label_ids = {
        h: torch.tensor(
            [labels.index(ex.labels[h]) if ex.labels.get(h) in labels else IGNORE for ex in train_set]
        )
        for h, labels in start.schema.heads.items()
    }
    class_weights = (
        {h: balanced_class_weights(y, len(start.schema.heads[h])).to(device) for h, y in label_ids.items()}
        if config.class_weighting == "balanced"
        else None
    )
    return _Encoded(encoding, [len(ids) for ids in encoding["input_ids"]], label_ids, class_weights)


def _optimizer(
    model: MultiHeadClassifier, config: TrainConfig, train_rows: int
) -> tuple[torch.optim.AdamW, LambdaLR]:
    """AdamW (no weight decay on biases and norms; the heads at their own rate), with linear warmup and
    decay over the run's steps."""
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    head_lr = config.head_learning_rate or config.learning_rate
    groups = [
        {
            "params": [p for n, p in model.encoder.named_parameters() if not n.endswith(no_decay)],
            "weight_decay": config.weight_decay,
            "lr": config.learning_rate,
        },
        {
            "params": [p for n, p in model.encoder.named_parameters() if n.endswith(no_decay)],
            "weight_decay": 0.0,
            "lr": config.learning_rate,
        },
        {"params": list(model.heads.parameters()), "weight_decay": config.weight_decay, "lr": head_lr},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    total_steps = math.ceil(train_rows / config.batch_size) * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * total_steps), total_steps
    )
    return optimizer, scheduler


def _fit(
    start: _Start,
    encoded: _Encoded,
    splits: _Splits,
    config: TrainConfig,
    optimizer: torch.optim.AdamW,
    scheduler: LambdaLR,
    device: torch.device,
    run: _Progress,
    progress: bool,
    on_progress: ProgressFn | None,
) -> None:
    """Epochs until the last, ``max_steps``, or ``patience`` epochs without a validation gain; ``run``
    keeps the best epoch's weights."""
    rng = random.Random(config.seed)
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.time()
        seen, loss_sum = _train_epoch(
            start, encoded, config, optimizer, scheduler, device, run, epoch, rng, progress
        )
        train_seconds = time.time() - epoch_start
        val_report = evaluate(
            start.model, start.tokenizer, splits.for_selection, config.max_length, device=device
        )
        score = mean_macro_f1(val_report)
        entry = {
            "event": "epoch",
            "run_id": run.run_id,
            "epoch": epoch,
            "step": run.step,
            "train_loss": loss_sum / max(seen, 1),
            "train_seconds": round(train_seconds, 3),
            "samples_per_s": round(seen / max(train_seconds, 1e-9), 2),
            "val_macro_f1": score,
            "val": {
                h: {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
                for h, m in val_report["heads"].items()
            },
        }
        run.history.append(entry)
        _log_run(entry)
        improved = _keep_if_best(start.model, run, epoch, score)
        _report_epoch(entry, config, run, improved, progress, on_progress)
        if config.max_steps and run.step >= config.max_steps:
            break
        if config.patience and run.stale >= config.patience:
            if progress:
                tqdm.write(f"early stopping: no gain for {run.stale} epoch(s); best epoch {run.best_epoch}")
            break


def _train_epoch(
    start: _Start,
    encoded: _Encoded,
    config: TrainConfig,
    optimizer: torch.optim.AdamW,
    scheduler: LambdaLR,
    device: torch.device,
    run: _Progress,
    epoch: int,
    rng: random.Random,
    progress: bool,
) -> tuple[int, float]:
    """One pass over the training split in length-grouped batches (stopping at ``max_steps``); the rows
    seen and their summed loss."""
    model, tokenizer, enc = start.model, start.tokenizer, encoded.encoding
    model.train()
    seen, loss_sum = 0, 0.0
    batches = length_grouped_batches(encoded.lengths, config.batch_size, rng)
    bar = tqdm(
        batches, desc=f"epoch {epoch}/{config.epochs}", unit="batch", disable=not progress, dynamic_ncols=True
    )
    for idx in bar:
        batch = tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc}, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        targets = {h: y[idx].to(device) for h, y in encoded.label_ids.items()}
        with autocast_context(device):
            logits = model(**batch)
        loss = masked_loss(logits, targets, encoded.class_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        run.step += 1
        seen += len(idx)
        loss_sum += loss.item() * len(idx)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        if config.max_steps and run.step >= config.max_steps:
            break
    bar.close()
    return seen, loss_sum


def _keep_if_best(model: MultiHeadClassifier, run: _Progress, epoch: int, score: float) -> bool:
    """Keep the epoch's weights (a CPU copy) when its validation score is the best so far."""
    if score <= run.best_score:
        run.stale += 1
        return False
    run.best_score, run.best_epoch, run.stale = score, epoch, 0
    run.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return True


def _report_epoch(
    entry: dict[str, Any],
    config: TrainConfig,
    run: _Progress,
    improved: bool,
    progress: bool,
    on_progress: ProgressFn | None,
) -> None:
    epoch, score = entry["epoch"], entry["val_macro_f1"]
    elapsed = time.time() - run.started
    if progress:
        tqdm.write(
            f"epoch {epoch}: loss {entry['train_loss']:.4f}, validation macro-F1 {score:.4f}"
            f"{' (best)' if improved else ''}, {entry['samples_per_s']:.1f} samples/s"
        )
    if on_progress:
        on_progress(
            {
                "epoch": epoch,
                "epochs": config.epochs,
                "val_macro_f1": score,
                "elapsed_s": elapsed,
                "eta_s": elapsed / epoch * (config.epochs - epoch),
            }
        )


def _save_version(
    start: _Start,
    examples: Sequence[Example],
    splits: _Splits,
    config: TrainConfig,
    registry: Registry,
    run: _Progress,
    device: torch.device,
    data_info: dict[str, Any] | None,
    activate_if_first: bool,
    progress: bool,
) -> tuple[VersionInfo, dict[str, Any]]:
    """The best checkpoint → temperatures fitted on the validation split → the report on the test split →
    a registry version (staged, then renamed atomically); the version and its report."""
    model, tokenizer, schema = start.model, start.tokenizer, start.schema
    val_probs = probabilities(
        model, tokenizer, [ex.text for ex in splits.validation], config.max_length, device
    )
    temperatures = fit_temperatures(schema, splits.validation, val_probs)
    with registry.staging() as staging:
        files = VersionFiles(staging)
        report = evaluate(
            model,
            tokenizer,
            splits.test or splits.for_selection,
            config.max_length,
            out_dir=files.eval.folder,
            device=device,
            progress=progress,
            temperatures=temperatures,
        )
        save_training_embeddings(
            files.neighbors,
            model,
            tokenizer,
            examples,
            splits.train,
            config.max_length,
            config.batch_size,
            device,
        )
        model.to("cpu").save(staging, tokenizer, config.max_length)
        write_jsonl(files.dataset, examples)
        info = VersionInfo(
            name="",
            created="",
            base_model=start.base_name,
            parent=config.init_from,
            status=ModelStatus.CANDIDATE,
            schema=schema.to_dict(),
            train_config=asdict(config),
            data={
                **(data_info or {}),
                "examples": len(examples),
                "label_counts": {h: dict(c) for h, c in label_counts(examples).items()},
                "splits": splits.sizes(),
                "best_epoch": run.best_epoch,
                "best_val_macro_f1": run.best_score,
                "test_split": splits.reported,
            },
            metrics=summary(report)["heads"],
            temperatures=temperatures,
        )
        version = registry.commit(staging, info, activate_if_first=activate_if_first)
    report["model_version"] = version.name
    return version, report

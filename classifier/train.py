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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

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
    run_id = uuid.uuid4().hex[:12]
    started = time.time()

    # 1. model: fresh on the base checkpoint, or warm-started from a registry version
    if config.init_from:
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
        base_name = parent_info.base_model
    else:
        base_path = Path(config.base_model) if config.base_model else default_base_model()
        model, tokenizer = MultiHeadClassifier.from_base(
            base_path, schema, pooling=config.pooling, dropout=config.dropout
        )
        base_name = str(base_path)
    model.to(device)

    # 2. split: stratified by the first head's label, ranked by text hash within each class, so a test text
    # stays a test text in later runs (as far as the class cuts allow)
    splits = split_examples(examples, config.split, config.split_salt, heads=list(schema.heads))
    train_set, val_set, test_set = splits["train"], splits["validation"], splits["test"]
    if not train_set:
        raise ValueError("no training examples after the split; add data")
    val_for_selection = val_set or train_set
    test_for_report = test_set or val_set or train_set

    # 3. tokenize once, without padding; pad per batch (dynamic padding)
    config = replace(config, max_length=_max_length(config, model, tokenizer, train_set, progress))
    enc = tokenizer([ex.text for ex in train_set], truncation=True, max_length=config.max_length)
    lengths = [len(ids) for ids in enc["input_ids"]]
    label_ids = {
        h: torch.tensor(
            [labels.index(ex.labels[h]) if ex.labels.get(h) in labels else IGNORE for ex in train_set]
        )
        for h, labels in schema.heads.items()
    }
    class_weights = (
        {h: balanced_class_weights(y, len(schema.heads[h])).to(device) for h, y in label_ids.items()}
        if config.class_weighting == "balanced"
        else None
    )

    # 4. optimiser and schedule
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
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * total_steps), total_steps
    )

    record = {
        "run_id": run_id,
        "config": asdict(config),
        "schema": schema.to_dict(),
        "device": str(device),
        "examples": {"train": len(train_set), "validation": len(val_set), "test": len(test_set)},
    }
    _log_run({"event": "start", "time": started, **record})
    rng = random.Random(config.seed)
    best_score, best_state, best_epoch, stale = -1.0, None, 0, 0
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        epoch_start, seen, loss_sum = time.time(), 0, 0.0
        batches = length_grouped_batches(lengths, config.batch_size, rng)
        bar = tqdm(
            batches,
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            disable=not progress,
            dynamic_ncols=True,
        )
        for idx in bar:
            batch = tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc}, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            targets = {h: y[idx].to(device) for h, y in label_ids.items()}
            with autocast_context(device):
                logits = model(**batch)
            loss = masked_loss(logits, targets, class_weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
            if config.max_steps and step >= config.max_steps:
                break
        bar.close()
        train_seconds = time.time() - epoch_start
        val_report = evaluate(
            model,
            tokenizer,
            val_for_selection,
            config.max_length,
            device=device,
        )
        score = mean_macro_f1(val_report)
        entry = {
            "event": "epoch",
            "run_id": run_id,
            "epoch": epoch,
            "step": step,
            "train_loss": loss_sum / max(seen, 1),
            "train_seconds": round(train_seconds, 3),
            "samples_per_s": round(seen / max(train_seconds, 1e-9), 2),
            "val_macro_f1": score,
            "val": {
                h: {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
                for h, m in val_report["heads"].items()
            },
        }
        history.append(entry)
        _log_run(entry)
        improved = score > best_score
        if improved:
            best_score, best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            stale += 1
        elapsed = time.time() - started
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
        if config.max_steps and step >= config.max_steps:
            break
        if config.patience and stale >= config.patience:
            if progress:
                tqdm.write(f"early stopping: no gain for {stale} epoch(s); best epoch {best_epoch}")
            break

    # 5. best checkpoint → temperatures fitted on the validation split → test report → registry version
    # (staged, then renamed atomically)
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    val_probs = probabilities(model, tokenizer, [ex.text for ex in val_set], config.max_length, device)
    temperatures = fit_temperatures(schema, val_set, val_probs)
    with registry.staging() as staging:
        files = VersionFiles(staging)
        report = evaluate(
            model,
            tokenizer,
            test_for_report,
            config.max_length,
            out_dir=files.eval.folder,
            device=device,
            progress=progress,
            temperatures=temperatures,
        )
        save_training_embeddings(
            staging, model, tokenizer, examples, train_set, config.max_length, config.batch_size, device
        )
        model.to("cpu").save(staging, tokenizer, config.max_length)
        write_jsonl(files.dataset, examples)
        counts = {h: dict(c) for h, c in label_counts(examples).items()}
        info = VersionInfo(
            name="",
            created="",
            base_model=base_name,
            parent=config.init_from,
            status=ModelStatus.CANDIDATE,
            schema=schema.to_dict(),
            train_config=asdict(config),
            data={
                **(data_info or {}),
                "examples": len(examples),
                "label_counts": counts,
                "splits": record["examples"],
                "best_epoch": best_epoch,
                "best_val_macro_f1": best_score,
                "test_split": "test" if test_set else ("validation" if val_set else "train"),
            },
            metrics=summary(report)["heads"],
            temperatures=temperatures,
        )
        version = registry.commit(staging, info, activate_if_first=activate_if_first)
    report["model_version"] = version.name
    _log_run(
        {
            "event": "end",
            "run_id": run_id,
            "version": version.name,
            "seconds": time.time() - started,
            "best_epoch": best_epoch,
            "test": summary(report)["heads"],
        }
    )
    return TrainResult(version=version, report=report, history=history)

"""The model: one shared BERT encoder, one linear classification head per task; one forward pass
gives all heads.

On disk (a registry version folder): ``encoder/`` and ``tokenizer/`` in Hugging Face format,
``heads.safetensors`` and ``model.json`` (pooling, label schema, max length).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from classifier.results import HeadPrediction
from classifier.schema import LabelSchema

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # weight-loading bars on every load; our own bars show training progress

POOLING = ("mean", "cls")


class ModelLoadError(RuntimeError):
    """A base model or saved model that cannot be loaded."""


class MultiHeadClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, schema: LabelSchema, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if pooling not in POOLING:
            raise ValueError(f"pooling must be one of {POOLING}, got {pooling!r}")
        self.encoder = encoder
        self.schema = schema
        self.pooling = pooling
        hidden = int(encoder.config.hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({h: nn.Linear(hidden, len(labels)) for h, labels in schema.heads.items()})

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        pooled = self.dropout(self.pool(input_ids, attention_mask, token_type_ids))
        return {h: head(pooled).float() for h, head in self.heads.items()}

    def pool(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The encoder's text representation that the heads read: [batch, hidden]."""
        kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        # mean over real tokens: what sentence-transformer encoders such as MiniLM were trained for
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, directory: Path, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(directory / "encoder")
        tokenizer.save_pretrained(directory / "tokenizer")
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()},
            str(directory / "heads.safetensors"),
        )
        meta = {
            "pooling": self.pooling,
            "max_length": max_length,
            "schema": self.schema.to_dict(),
            "dropout": self.dropout.p,
        }
        (directory / "model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_base(
        cls,
        base: Path | str,
        schema: LabelSchema,
        pooling: str = "mean",
        dropout: float = 0.1,
        tokenizer_dir: Path | None = None,
    ) -> tuple[MultiHeadClassifier, PreTrainedTokenizerBase]:
        """A fresh model on a local Hugging Face BERT-family checkpoint (folder with config + weights).

        The tokenizer comes from the same folder unless ``tokenizer_dir`` says otherwise.
        """
        base = Path(base)
        if not (base / "config.json").is_file():
            raise ModelLoadError(f"{base}: not a Hugging Face model folder (no config.json)")
        try:
            encoder = AutoModel.from_pretrained(base, dtype=torch.float32, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or base, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{base}: cannot load the base model: {exc}") from exc
        return cls(encoder, schema, pooling=pooling, dropout=dropout), tokenizer

    @classmethod
    def load(cls, directory: Path) -> tuple[MultiHeadClassifier, PreTrainedTokenizerBase, int]:
        """Load a saved model; returns (model, tokenizer, max_length), in eval mode on the CPU."""
        try:
            meta = json.loads((directory / "model.json").read_text(encoding="utf-8"))
            schema = LabelSchema.from_dict(meta["schema"])
            encoder = AutoModel.from_pretrained(
                directory / "encoder", dtype=torch.float32, local_files_only=True
            )
            tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer", local_files_only=True)
            model = cls(
                encoder, schema, pooling=meta.get("pooling", "mean"), dropout=meta.get("dropout", 0.1)
            )
            model.heads.load_state_dict(load_file(str(directory / "heads.safetensors")))
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{directory}: cannot load the model: {exc}") from exc
        model.eval()
        return model, tokenizer, int(meta["max_length"])

    @staticmethod
    def load_parts(directory: Path) -> tuple[LabelSchema, PreTrainedTokenizerBase, int]:
        """What serving a saved model needs besides its weights: (schema, tokenizer, max_length)."""
        try:
            meta = json.loads((directory / "model.json").read_text(encoding="utf-8"))
            schema = LabelSchema.from_dict(meta["schema"])
            tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer", local_files_only=True)
        except (OSError, KeyError, ValueError) as exc:
            raise ModelLoadError(f"{directory}: cannot load the model: {exc}") from exc
        return schema, tokenizer, int(meta["max_length"])

    def warm_start_from(self, other: MultiHeadClassifier) -> None:
        """Copy encoder weights and, label by label, the head rows of a previous model.

        Labels new to this schema keep their fresh initialisation, so a retrain can add labels.
        """
        self.encoder.load_state_dict(other.encoder.state_dict())
        with torch.no_grad():
            for head, layer in self.heads.items():
                if head not in other.heads:
                    continue
                old_labels = other.schema.heads[head]
                old = other.heads[head]
                for i, label in enumerate(self.schema.heads[head]):
                    if label in old_labels:
                        j = old_labels.index(label)
                        layer.weight[i].copy_(old.weight[j])
                        layer.bias[i].copy_(old.bias[j])


# ---- the inference path: serving (engine.py) and evaluation (evaluate.py) both run texts through it, so
# the retraining gate judges exactly what users get --------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """A device by name: "auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:1", ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


def use_bf16(device: torch.device, configured: bool | None = None) -> bool:
    """bf16 autocast as configured, else on CUDA only: on the CPU it pays only with AVX512-BF16/AMX and
    moves probabilities by ~1e-3."""
    return configured if configured is not None else device.type == "cuda"


def autocast_context(device: torch.device) -> Any:
    """The autocast of a forward pass on ``device`` (``use_bf16``); training uses it too."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(device))


def batch_limits(device: torch.device, max_batch_tokens: int | None = None) -> tuple[int, int]:
    """(padded tokens per forward pass, the fixed cost of one more pass in padding tokens) on ``device``.

    Measured with MiniLM on a 2-core CPU: 1-2k-token batches beat larger ones (they stay in cache); a GPU
    wants large batches, and a pass there has a larger fixed cost."""
    max_tokens = max_batch_tokens or (16384 if device.type == "cuda" else 2048)
    return max_tokens, max_tokens // 32


# ids and attention mask (right-padded int64 arrays) in, each head's class probabilities out
Runner = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


def torch_runner(
    model: MultiHeadClassifier, device: torch.device, bf16: bool | None = None, compile: bool = False
) -> Runner:
    """The model (on ``device``, in eval mode) as a Runner; ``bf16``: see ``use_bf16``; ``compile``:
    torch.compile it first."""
    # dynamic=True: one graph for all batch shapes instead of a recompile per shape.
    module = torch.compile(model, dynamic=True) if compile else model
    autocast = use_bf16(device, bf16)

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = module(
                input_ids=torch.from_numpy(input_ids).to(device),
                attention_mask=torch.from_numpy(attention_mask).to(device),
            )
            return {
                head: torch.softmax(value.float(), dim=-1).cpu().numpy() for head, value in logits.items()
            }

    return run


def predict_probs(
    runner: Runner,
    schema: LabelSchema,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """Class probabilities per head (arrays of shape [len(texts), n_labels]) as the engine computes them
    with its default batching on ``device`` (where ``runner`` runs): the same tokenization, micro-batches,
    padding and runner."""
    out = {h: np.zeros((len(texts), len(labels)), dtype=np.float32) for h, labels in schema.heads.items()}
    if not texts:
        return out
    ids, _ = tokenize(tokenizer, list(texts), max_length)
    pad_id = pad_token_id(tokenizer)
    for batch in micro_batches([len(row) for row in ids], *batch_limits(device)):
        for head, value in run_padded(runner, [ids[i] for i in batch], pad_id).items():
            out[head][batch] = value
    return out


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> tuple[list[list[int]], list[bool]]:
    """Input ids per text (cut at ``max_length``) and whether each was cut.

    One pass without truncation gives the true lengths; only the (rare) long texts are tokenized again
    with truncation, so the result equals ``tokenizer(..., truncation=True, max_length=...)``.
    """
    ids: list[list[int]] = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
    long = [i for i, row in enumerate(ids) if len(row) > max_length]
    if long:
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=max_length)["input_ids"]
        for i, row in zip(long, cut, strict=True):
            ids[i] = row
    truncated = [False] * len(texts)
    for i in long:
        truncated[i] = True
    return ids, truncated


def micro_batches(lengths: list[int], max_tokens: int, batch_cost: int = 0) -> list[list[int]]:
    """Split texts (by token length) into forward passes of at most ``max_tokens`` padded tokens.

    Texts are sorted by length and cut where the padding saved outweighs the fixed cost of one more
    forward pass (``batch_cost``, in tokens): an optimal partition of the sorted list by dynamic
    programming, cost = sum over batches of (batch_cost + rows x longest row). A single text longer than
    ``max_tokens`` gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    n = len(sizes)
    best = [0.0] + [math.inf] * n  # best[j]: cheapest split of the first j texts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = sizes[j - 1]  # sorted: the last text of a batch is its longest
        rows = max(1, max_tokens // max(longest, 1))  # the most texts a batch ending here may hold
        for i in range(j - 1, max(-1, j - 1 - rows), -1):
            cost = best[i] + batch_cost + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches: list[list[int]] = []
    j = n
    while j > 0:
        batches.append(order[cut[j] : j])
        j = cut[j]
    return batches[::-1]


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0


def run_padded(runner: Runner, rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, np.ndarray]:
    """Class probabilities per head for tokenized rows, right-padded to the longest into one batch."""
    return runner(*pad_batch(rows, pad_id))


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad tokenized rows: (input_ids, attention_mask), int64 arrays of shape [rows, longest]."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def to_predictions(schema: LabelSchema, probs: dict[str, np.ndarray], row: int) -> dict[str, HeadPrediction]:
    result: dict[str, HeadPrediction] = {}
    for head, labels in schema.heads.items():
        p = probs[head][row]
        best = int(p.argmax())
        result[head] = HeadPrediction(
            label=labels[best],
            confidence=float(p[best]),
            scores={label: float(v) for label, v in zip(labels, p, strict=True)},
        )
    return result

"""Why this label: the labeled training messages most like a text, among those of its predicted label.

At training time the pooled embedding (what the heads read) of every training-split row labeled for the
first head (topic) is saved with the version, L2-normalized, in float16, in the file its
``VersionFiles.neighbors`` names (registry.py; every function here is given that path)::

    embeddings [rows, hidden] float16, rows (each one's line in dataset.jsonl), labels, head

No text is copied there: the texts stay in the version's ``dataset.jsonl``, looked up when the version is
loaded, and `triage data forget` (``Registry.erase_rows``) drops the forgotten rows' embeddings with
their lines (``erase``). Serving: cosine similarity is one matrix product of the text's normalized
embedding with the rows of its predicted label, then the top k; computed only for calls that ask.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from classifier.data import Example, read_jsonl
from classifier.results import Neighbor

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from classifier.model import MultiHeadClassifier

# ids and attention mask in, (each head's probabilities, pooled embeddings [rows, hidden]) out
PooledRunner = Callable[[np.ndarray, np.ndarray], tuple[dict[str, np.ndarray], np.ndarray]]


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    vectors = vectors.astype(np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def embed_texts(
    model: MultiHeadClassifier,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Normalized pooled embeddings [len(texts), hidden] in float32, batches sorted by length."""
    import torch  # here, not at the top: the registry imports this module and needs no torch

    from classifier.model import pad_batch

    out = np.zeros((len(texts), int(model.encoder.config.hidden_size)), dtype=np.float32)
    rows = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(texts)), key=lambda i: len(rows[i]))
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad_batch([rows[i] for i in idx], pad_id)
            pooled = model.pool(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
            out[idx] = pooled.float().cpu().numpy()
    return normalized(out)


def save_training_embeddings(
    path: Path,
    model: MultiHeadClassifier,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    train_set: Sequence[Example],
    max_length: int,
    batch_size: int,
    device: torch.device,
) -> int:
    """Write the embeddings file at ``path`` for the training rows labeled for the first head;
    ``examples`` are the rows of dataset.jsonl in order (``train_set`` holds some of them). Returns the
    rows saved."""
    head = next(iter(model.schema.heads))
    known = set(model.schema.heads[head])
    line = {id(ex): i for i, ex in enumerate(examples)}
    chosen = [ex for ex in train_set if ex.labels.get(head) in known and id(ex) in line]
    embeddings = embed_texts(model, tokenizer, [ex.text for ex in chosen], max_length, batch_size, device)
    _write(
        path,
        embeddings.astype(np.float16),
        np.array([line[id(ex)] for ex in chosen], dtype=np.int64),
        np.array([ex.labels[head] for ex in chosen], dtype=str),
        head,
    )
    return len(chosen)


def erase(path: Path, removed_lines: Sequence[int]) -> None:
    """Drop from the embeddings file at ``path`` the dataset.jsonl lines being removed, renumbering the
    lines that stay (called by ``Registry.erase_rows`` as it rewrites dataset.jsonl without them)."""
    if not path.is_file() or not removed_lines:
        return
    with np.load(path, allow_pickle=False) as saved:
        embeddings, rows, labels, head = (
            saved["embeddings"],
            saved["rows"],
            saved["labels"],
            str(saved["head"]),
        )
    removed = np.unique(np.asarray(removed_lines, dtype=np.int64))
    keep = ~np.isin(rows, removed)
    renumbered = rows[keep] - np.searchsorted(removed, rows[keep])
    _write(path, embeddings[keep], renumbered, labels[keep], head)


def _write(path: Path, embeddings: np.ndarray, rows: np.ndarray, labels: np.ndarray, head: str) -> None:
    """Through a temporary file and a rename: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, embeddings=embeddings, rows=rows, labels=labels, head=np.array(head))
    os.replace(tmp, path)


@dataclass
class NeighborIndex:
    """A version's saved training embeddings, grouped by label for the search."""

    head: str
    texts: list[str]  # per saved row
    sources: list[str]  # per saved row: the training row's source
    blocks: dict[str, tuple[np.ndarray, np.ndarray]]  # label -> (float32 embeddings, row numbers)

    @classmethod
    def load(cls, path: Path, dataset: Path) -> NeighborIndex | None:
        """The index saved at ``path`` (texts from its version's ``dataset`` file), or None when there is
        none (a version trained before neighbors were saved)."""
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as saved:
            embeddings, rows, labels, head = (
                saved["embeddings"].astype(np.float32),
                saved["rows"],
                saved["labels"],
                str(saved["head"]),
            )
        lines = read_jsonl(dataset)
        texts = [lines[i].text for i in rows]
        sources = [lines[i].source for i in rows]
        blocks = {
            str(label): (embeddings[labels == label], np.flatnonzero(labels == label))
            for label in np.unique(labels)
        }
        return cls(head, texts, sources, blocks)

    def nearest(self, embedding: np.ndarray, label: str, k: int) -> list[Neighbor]:
        """The ``k`` saved rows of ``label`` most similar (cosine) to a normalized ``embedding``."""
        if label not in self.blocks or k < 1:
            return []
        vectors, rows = self.blocks[label]
        similarity = vectors @ embedding
        k = min(k, len(similarity))
        top = np.argpartition(-similarity, k - 1)[:k]
        top = top[np.argsort(-similarity[top])]
        return [
            Neighbor(self.texts[rows[i]], label, float(similarity[i]), self.sources[rows[i]]) for i in top
        ]


def torch_pooled_runner(model: MultiHeadClassifier, device: torch.device, bf16: bool) -> PooledRunner:
    """As ``model.torch_runner`` (uncompiled), also returning the pooled embeddings of the same pass."""
    import torch

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pooled = model.pool(
                torch.from_numpy(input_ids).to(device), torch.from_numpy(attention_mask).to(device)
            )
            probs = {
                head: torch.softmax(layer(pooled).float(), dim=-1).cpu().numpy()
                for head, layer in model.heads.items()
            }
            return probs, pooled.float().cpu().numpy()

    return run

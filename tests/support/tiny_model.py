"""A tiny randomly initialised BERT with the packaged MiniLM tokenizer: real code paths, fast tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from classifier.model import MultiHeadClassifier
from classifier.paths import default_base_model
from classifier.registry import Registry, VersionInfo
from classifier.schema import LabelSchema


def make_tiny_bert(directory: Path, seed: int = 0) -> Path:
    """Write a 2-layer, 32-wide BERT checkpoint plus tokenizer to ``directory`` and return it."""
    if (directory / "config.json").is_file():
        return directory
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(default_base_model(), local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_version(
    registry: Registry, base: Path, schema: LabelSchema | None = None, seed: int = 0, activate: bool = True
) -> VersionInfo:
    """Save an untrained multi-head model on the tiny BERT as a new registry version."""
    torch.manual_seed(seed)
    model, tokenizer = MultiHeadClassifier.from_base(base, schema or LabelSchema())
    with registry.staging() as staging:
        model.save(staging, tokenizer, max_length=64)
        info = registry.commit(
            staging,
            VersionInfo(name="", created="", base_model=str(base), schema=model.schema.to_dict()),
            activate_if_first=activate,
        )
    return info

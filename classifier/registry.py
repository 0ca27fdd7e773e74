"""Versioned model artifacts in a registry folder (``$TRIAGE_DATA_DIR/models``).

Layout::

    models/
      ACTIVE                  name of the active version (replaced atomically)
      v1/ v2/ ...             one folder per version (``VersionFiles`` names each file):
        model files             encoder/, tokenizer/, heads.safetensors, model.json (see model.py)
        version.json            its ``VersionInfo``
        dataset.jsonl           the rows it was trained and tested on
        neighbors.npz           the training rows' embeddings, by dataset.jsonl line (see neighbors.py)
        eval/                   the test-split evaluation (``EvalFiles``: metrics.json, plots,
                                wrong_predictions.csv); eval/heldout/ and eval/heldout-<incumbent>/: the
                                retraining gate's evaluation of it and of the incumbent on the same rows.
                                dataset.jsonl and the wrong_predictions.csv files are the only files
                                holding texts
        onnx/                   made on first use (see onnx_backend.py)
      .staging-*/             versions being written; never visible as a version until renamed

A version becomes visible only by an atomic rename of a complete staging folder, so a crash never
leaves a half-written version behind.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from filelock import FileLock

from classifier import neighbors
from classifier.data import DEFAULT_SPLIT_SALT, Example, Split, read_jsonl, split_examples, to_jsonl

_NAME = re.compile(r"^v(\d+)$")


class ModelStatus(StrEnum):
    """Where a version stands; exactly one is active: the one the ACTIVE pointer names."""

    ACTIVE = "active"
    CANDIDATE = "candidate"  # trained, not (yet) promoted
    REJECTED = "rejected"  # the retraining gate kept the incumbent
    RETIRED = "retired"  # was active until another version was


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (unknown version, nothing trained yet)."""


@dataclass(frozen=True)
class EvalFiles:
    """The files ``evaluate(..., out_dir=folder)`` writes into one evaluation folder."""

    folder: Path

    WRONG_PREDICTIONS: ClassVar[str] = "wrong_predictions.csv"  # the one report file holding texts

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.json"

    @property
    def wrong_predictions(self) -> Path:
        return self.folder / self.WRONG_PREDICTIONS

    def confusion_png(self, head: str) -> Path:
        return self.folder / f"confusion_{head}.png"

    def reliability_png(self, head: str) -> Path:
        return self.folder / f"reliability_{head}.png"

    def roc_png(self, head: str) -> Path:
        return self.folder / f"roc_{head}.png"


@dataclass(frozen=True)
class VersionFiles:
    """Where each file of a version folder (or of a staging folder becoming one) lives."""

    folder: Path

    @property
    def info(self) -> Path:
        return self.folder / "version.json"

    @property
    def dataset(self) -> Path:
        """The rows the version was trained and tested on (see ``data.write_jsonl``)."""
        return self.folder / "dataset.jsonl"

    @property
    def neighbors(self) -> Path:
        """The training rows' embeddings, by dataset.jsonl line: why this label (see neighbors.py)."""
        return self.folder / "neighbors.npz"

    @property
    def eval(self) -> EvalFiles:
        """The evaluation of the best checkpoint on the test split, made at training time."""
        return EvalFiles(self.folder / "eval")

    def heldout_eval(self, incumbent: str | None = None) -> EvalFiles:
        """The retraining gate's evaluation of this version on its held-out rows, or with ``incumbent``:
        of that version on the same rows."""
        return EvalFiles(self.eval.folder / ("heldout" if incumbent is None else f"heldout-{incumbent}"))

    def all_wrong_predictions(self) -> list[Path]:
        """Every evaluation's ``wrong_predictions.csv`` (the test split's and the gate's)."""
        return sorted(self.eval.folder.glob(f"**/{EvalFiles.WRONG_PREDICTIONS}"))

    @property
    def onnx(self) -> Path:
        """The folder of the version's ONNX files (see onnx_backend.py)."""
        return self.folder / "onnx"


@dataclass
class VersionInfo:
    name: str
    created: str
    base_model: str
    parent: str | None = None  # the version it was warm-started from
    status: ModelStatus = ModelStatus.CANDIDATE
    reason: str = ""  # why it was rejected, retired or promoted
    schema: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # fingerprints and counts of the training data
    metrics: dict[str, Any] = field(default_factory=dict)  # evaluation on the held-out test split
    # head -> softmax temperature fitted on the validation split (calibration.py); a head absent: 1.0
    temperatures: dict[str, float] = field(default_factory=dict)
    path: str = ""

    def split_config(self) -> tuple[tuple[float, float, float], str]:
        """The (fractions, salt) of the stable split this version was trained with."""
        train, validation, test = self.train_config.get("split", (0.8, 0.1, 0.1))
        return (train, validation, test), self.train_config.get("split_salt", DEFAULT_SPLIT_SALT)

    def split(self, examples: Sequence[Example]) -> dict[Split, list[Example]]:
        """``examples`` split as this version's training split its data (its fractions and salt, stratified
        by its heads in order): a retraining run's split, and the rows this version was judged on."""
        fractions, salt = self.split_config()
        return split_examples(examples, fractions, salt, heads=list(self.schema.get("heads", {})))

    @property
    def files(self) -> VersionFiles:
        return VersionFiles(Path(self.path))

    @property
    def number(self) -> int:
        m = _NAME.match(self.name)
        return int(m.group(1)) if m else -1


class Registry:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.root / ".lock"), timeout=60)

    # ---- reading -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        found = [p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return sorted(found, key=lambda n: int(n[1:]))

    def path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise RegistryError(f"{name!r} is not a version name (expected v1, v2, ...)")
        path = self.root / name
        if not VersionFiles(path).info.is_file():
            raise RegistryError(f"no model version {name!r} (known: {', '.join(self.names()) or 'none'})")
        return path

    def files(self, name: str) -> VersionFiles:
        return VersionFiles(self.path(name))

    def get(self, name: str) -> VersionInfo:
        raw = json.loads(self.files(name).info.read_text(encoding="utf-8"))
        info = VersionInfo(**raw)
        info.path = str(self.root / name)
        recorded = ModelStatus(info.status)
        if name == self.active_name():  # the pointer decides: the first version's record says candidate
            info.status = ModelStatus.ACTIVE
        else:
            info.status = ModelStatus.RETIRED if recorded == ModelStatus.ACTIVE else recorded
        return info

    def list(self) -> list[VersionInfo]:
        return [self.get(n) for n in self.names()]

    def active_name(self) -> str | None:
        try:
            name = (self.root / "ACTIVE").read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return name or None

    def active(self) -> VersionInfo:
        name = self.active_name()
        if name is None:
            raise RegistryError(f"no active model in {self.root}: train one with `triage train`")
        return self.get(name)

    # ---- writing -------------------------------------------------------------------------------
    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A scratch folder for a new version; removed on error, and on success unless committed."""
        path = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            yield path
        finally:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)

    def commit(self, staging: Path, info: VersionInfo, activate_if_first: bool = True) -> VersionInfo:
        """Give a complete staging folder the next version name (atomic rename) and return its info."""
        with self._lock:
            numbers = [int(n[1:]) for n in self.names()]
            info.name = f"v{max(numbers, default=0) + 1}"
            info.created = info.created or _now()
            info.path = ""
            _write_json(VersionFiles(staging).info, asdict(info))
            os.rename(staging, self.root / info.name)
            if activate_if_first and self.active_name() is None:
                self._write_active(info.name)
        return self.get(info.name)

    def activate(self, name: str, reason: str = "") -> VersionInfo:
        """Make ``name`` the active version; the previous one becomes retired."""
        with self._lock:
            self.path(name)
            previous = self.active_name()
            self._write_active(name)
            self._update(name, status=ModelStatus.ACTIVE, reason=reason or "activated")
            if previous and previous != name:
                self._update(previous, status=ModelStatus.RETIRED, reason=f"replaced by {name}")
        return self.get(name)

    def set_status(self, name: str, status: ModelStatus, reason: str) -> VersionInfo:
        with self._lock:
            self._update(name, status=status, reason=reason)
        return self.get(name)

    def update_metrics(self, name: str, metrics: dict[str, Any]) -> None:
        with self._lock:
            self._update(name, metrics=metrics)

    def prune(self, keep: int) -> list[str]:
        """Delete the oldest versions beyond ``keep``, never the active one; returns the names deleted."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        removed = []
        with self._lock:
            active = self.active_name()
            names = self.names()
            for name in names[: max(0, len(names) - keep)]:
                if name != active:
                    shutil.rmtree(self.root / name)
                    removed.append(name)
        return removed

    def row_sources(self) -> set[str]:
        """The ``source`` of every training row any version keeps (its ``dataset.jsonl``)."""
        found: set[str] = set()
        for name in self.names():
            found.update(row.source for row in _read_dataset(VersionFiles(self.root / name)))
        return found

    def erase_rows(self, sources: Collection[str]) -> dict[str, int]:
        """Remove every row whose ``source`` is in ``sources`` from each version's data and reports.

        The texts live in ``dataset.jsonl`` and in ``wrong_predictions.csv`` under ``eval/``; both are
        rewritten without those rows (atomically), and ``version.json`` records how many training rows
        were erased, since the model itself was trained on them. Returns rows removed per version.
        """
        erase = set(sources)
        removed: dict[str, int] = {}
        if not erase:
            return removed
        with self._lock:
            for name in self.names():
                files = VersionFiles(self.root / name)
                rows = _read_dataset(files)
                kept = [r for r in rows if r.source not in erase]
                for report in files.all_wrong_predictions():
                    _erase_csv_rows(report, erase)
                if len(kept) == len(rows):
                    continue
                neighbors.erase(files.neighbors, [i for i, r in enumerate(rows) if r.source in erase])
                _write_text(files.dataset, to_jsonl(kept))
                removed[name] = len(rows) - len(kept)
                data = json.loads(files.info.read_text(encoding="utf-8")).get("data", {})
                data["erased_rows"] = data.get("erased_rows", 0) + removed[name]
                self._update(name, data=data)
        return removed

    def clean_staging(self, older_than_s: float = 0) -> None:
        """Remove staging folders left by a killed process."""
        now = time.time()
        for p in self.root.glob(".staging-*"):
            if now - p.stat().st_mtime >= older_than_s:
                shutil.rmtree(p, ignore_errors=True)

    def _update(self, name: str, **changes: Any) -> None:
        path = self.files(name).info
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw.update(changes)
        _write_json(path, raw)

    def _write_active(self, name: str) -> None:
        _write_text(self.root / "ACTIVE", name + "\n")


def _read_dataset(files: VersionFiles) -> list[Example]:
    return read_jsonl(files.dataset) if files.dataset.is_file() else []


def _erase_csv_rows(path: Path, sources: set[str]) -> None:
    """Rewrite a report CSV (with a ``source`` column) without the rows of ``sources``."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    kept = [r for r in rows if r.get("source") not in sources]
    if len(kept) == len(rows):
        return
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(kept)
    _write_text(path, out.getvalue())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

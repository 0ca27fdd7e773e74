"""Labeled data: CSV/JSONL import with validation, the stable train/validation/test split, fingerprints.

A row is a text plus one optional label per head; an empty cell means "no label for this head", so
files that label different heads (e.g. topic-only and sentiment-only sets) can be trained together.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import hashlib
import io
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from classifier.schema import LabelSchema

MAX_TEXT_CHARS = 20_000
Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
DEFAULT_SPLIT_SALT = "triage-split-v1"


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and line."""


@dataclass
class Example:
    text: str
    labels: dict[str, str] = field(default_factory=dict)  # head -> label; absent head = unlabeled
    source: str = ""  # "file:line", or "slack:<message id>" for feedback rows
    # heads whose label is for training only (a prediction nobody corrected): never ranked or judged on
    train_only: tuple[str, ...] = ()

    def judged_labels(self) -> dict[str, str]:
        """The labels a model may be judged on: every label but the training-only ones."""
        return {h: v for h, v in self.labels.items() if h not in self.train_only}

    def to_json(self) -> dict[str, object]:
        raw: dict[str, object] = {"text": self.text, "labels": self.labels, "source": self.source}
        if self.train_only:
            raw["train_only"] = list(self.train_only)
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> Example:
        labels = raw.get("labels") or {}
        train_only = raw.get("train_only") or []
        assert isinstance(labels, dict) and isinstance(train_only, list)
        return cls(
            text=str(raw["text"]),
            labels={str(k): str(v) for k, v in labels.items()},
            source=str(raw.get("source", "")),
            train_only=tuple(str(h) for h in train_only),
        )


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        ) from None


def _header_hint(header: list[str], text_column: str, rows: Iterator[list[str]]) -> str:
    """What the header has instead: semicolons, or the column that most likely holds the texts (the
    closest name, else the one with the longest values in the first rows)."""
    if len(header) == 1 and ";" in header[0]:
        return f"the file looks semicolon-separated ({header[0]!r}): save it with commas as separators"
    if not any(header):
        return "the header is empty"
    close = difflib.get_close_matches(text_column, header, n=1, cutoff=0.6)
    if close:
        likely = close[0]
    else:
        lengths = [0] * len(header)
        with contextlib.suppress(csv.Error):
            for row in itertools.islice(rows, 50):
                for i, value in enumerate(row[: len(header)]):
                    lengths[i] += len(value)
        likely = header[max(range(len(header)), key=lambda i: lengths[i])]
    return f"found: {', '.join(header)}; if the texts are in {likely!r}, pass --text-column {likely}"


def _rows_csv(path: Path, text: str, text_column: str) -> Iterable[tuple[int, dict[str, str | None]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}:1: the file is empty; a header row is required") from None
    except csv.Error as exc:
        raise DataError(f"{path}:1: malformed CSV header: {exc}") from None
    header = [h.strip() for h in header]
    if text_column not in header:
        hint = _header_hint(header, text_column, reader)
        raise DataError(f"{path}:1: no {text_column!r} column in the header; {hint}")
    if len(set(header)) != len(header):
        dupes = sorted(h for h, n in Counter(header).items() if n > 1)
        raise DataError(f"{path}:1: duplicate column name(s) {', '.join(dupes)}")
    line = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path}:{line}: malformed CSV: {exc}") from None
        start, line = line, reader.line_num + 1
        if not row:  # a blank line
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{start}: expected {len(header)} fields, found {len(row)}")
        yield start, {h: (v if v.strip() else None) for h, v in zip(header, row, strict=True)}


def _rows_jsonl(path: Path, text: str) -> Iterable[tuple[int, dict[str, str | None]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: each line must be a JSON object")
        row: dict[str, str | None] = {}
        for key, value in obj.items():
            if value is not None and not isinstance(value, str | int):
                raise DataError(f"{path}:{number}: field {key!r} must be a string")
            row[str(key)] = None if value is None or str(value).strip() == "" else str(value)
        yield number, row


def read_rows(path: Path, text_column: str = "text") -> list[tuple[int, dict[str, str | None]]]:
    """Parse a CSV or JSONL file into (line, row) pairs; the format follows the file extension."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = _decode(path)
    if path.suffix.lower() in {".jsonl", ".ndjson"}:
        rows = list(_rows_jsonl(path, text))
    else:
        rows = list(_rows_csv(path, text, text_column))
    return rows


def load_examples(
    paths: Sequence[Path],
    schema: LabelSchema,
    text_column: str = "text",
    infer_labels: bool = False,
) -> tuple[list[Example], LabelSchema]:
    """Read and validate every file before anything is used; returns the examples and the schema they fit.

    The returned schema keeps only the heads that appear in the data. Unknown labels are an error unless
    ``infer_labels`` or the schema's ``allow_new_labels`` is set, in which case they are added to the head.
    """
    heads = {h: list(labels) for h, labels in schema.heads.items()}
    extendable = infer_labels or schema.allow_new_labels
    examples: list[Example] = []
    seen_heads: set[str] = set()
    for path in paths:
        path = Path(path)
        rows = read_rows(path, text_column)
        if not rows:
            raise DataError(f"{path}: no data rows")
        columns = set(rows[0][1])
        if path.suffix.lower() in {".jsonl", ".ndjson"} and not any(text_column in r for _, r in rows[:1]):
            keys = list(rows[0][1])
            sample = ([r.get(k) or "" for k in keys] for _, r in rows)
            raise DataError(
                f"{path}:{rows[0][0]}: no {text_column!r} field; {_header_hint(keys, text_column, sample)}"
            )
        file_heads = [h for h in heads if h in columns or any(h in r for _, r in rows)]
        if not file_heads:
            raise DataError(
                f"{path}:1: no label column; expected one of: {', '.join(heads)} "
                f"(columns: {', '.join(sorted(columns))})"
            )
        seen_heads.update(file_heads)
        for line, row in rows:
            where = f"{path}:{line}"
            text = row.get(text_column)
            if text is None:
                raise DataError(f"{where}: empty {text_column!r}")
            if len(text) > MAX_TEXT_CHARS:
                raise DataError(f"{where}: text is {len(text):,} characters; the limit is {MAX_TEXT_CHARS:,}")
            labels: dict[str, str] = {}
            for head in file_heads:
                label = row.get(head)
                if label is None:
                    continue
                label = label.strip()
                if label not in heads[head]:
                    if not extendable:
                        raise DataError(
                            f"{where}: unknown {head} label {label!r} (known: {', '.join(heads[head])}); "
                            "add it to the schema or pass --infer-labels"
                        )
                    heads[head].append(label)
                labels[head] = label
            examples.append(Example(text=text, labels=labels, source=f"{path.name}:{line}"))
    counts = label_counts(examples)
    used = {h: heads[h] for h in heads if h in seen_heads and h in counts}  # a column with no labels: no head
    if infer_labels:  # the labels the data has, in a stable, readable order
        used = {h: sorted(counts.get(h, {})) for h in used}
    for head in used:
        present = [label for label in used[head] if counts[head].get(label)]
        if len(present) < 2:
            raise DataError(
                f"{', '.join(str(p) for p in paths)}: head {head!r} has {len(present)} distinct "
                f"label(s) in the "
                "data; a head needs at least 2"
            )
    result = LabelSchema(heads=used, allow_new_labels=schema.allow_new_labels)
    result.validate_trainable()
    return examples, result


def load_with_own_labels(
    paths: Sequence[Path], default: LabelSchema, text_column: str = "text", first_model: bool = False
) -> tuple[list[Example], LabelSchema, list[str]]:
    """Load data that is not bound to an existing schema: a head takes its labels from the data when the data
    has labels ``default`` lacks and either no model exists yet (``first_model``) or most of the head's
    labels are new (the data clearly brings its own set); other heads keep the strict check, so a typo in
    an otherwise known set is still an error. Returns the examples, their schema and the heads inferred."""
    examples, found = load_examples(paths, default, text_column=text_column, infer_labels=True)
    inferred = []
    for head, labels in found.heads.items():
        new = set(labels) - set(default.heads.get(head, []))
        if new and (first_model or 2 * len(new) > len(labels)):
            inferred.append(head)
    if inferred and len(inferred) == len(found.heads):
        return examples, found, inferred
    heads = {h: (found.heads[h] if h in inferred else list(labels)) for h, labels in default.heads.items()}
    examples, used = load_examples(paths, LabelSchema(heads=heads), text_column=text_column)
    return examples, used, inferred


def label_counts(examples: Iterable[Example]) -> dict[str, Counter[str]]:
    counts: dict[str, Counter[str]] = {}
    for ex in examples:
        for head, label in ex.labels.items():
            counts.setdefault(head, Counter())[label] += 1
    return counts


_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _WS.sub(" ", text.strip().lower())


def _hash_rank(text: str, salt: str) -> float:
    """A uniform number in [0, 1) from a salted hash of the normalized text: a text's place in its class."""
    digest = hashlib.sha256(f"{salt}\x00{normalize(text)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _share(n: int, fraction: float) -> int:
    """Rows of a class of ``n`` that go to a held-out split: the fraction rounded half up, and at least one
    once the class has a row for each split (3), so that no class is missing from validation or test."""
    if fraction <= 0:
        return 0
    return max(1 if n >= len(SPLITS) else 0, math.floor(n * fraction + 0.5))


def stratum(example: Example, heads: Sequence[str] = ()) -> tuple[str, str] | None:
    """The class a row is stratified by: its label of the first of ``heads`` it has a judged label for
    (then any other head, by name); ``None`` for a row with judged labels for no head."""
    judged = example.judged_labels()
    order = [h for h in heads if h in judged] + sorted(h for h in judged if h not in heads)
    return (order[0], judged[order[0]]) if order else None


def split_examples(
    examples: Sequence[Example],
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    salt: str = DEFAULT_SPLIT_SALT,
    heads: Sequence[str] = (),
) -> dict[Split, list[Example]]:
    """The stratified, stable train/validation/test split.

    Within each class (``stratum``: the label of the first of ``heads`` a row has), distinct texts are
    ranked by a salted hash of their normalized form and the class is cut at its 80% and 90% ranks: the
    highest-ranked tenth is test, the tenth below it validation, the rest train. The hash is uniform, so
    the cuts sit near the same hash values at any data size: as data grows only texts next to a cut move,
    to the neighbouring split. Copies of a text share one split. Rows whose labels are all training-only
    (``Example.train_only``) are never ranked and always train; a held-out row keeps its judged labels only.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f < 0 for f in fractions) or fractions[0] <= 0:
        raise ValueError(f"split fractions must be non-negative, sum to 1 and train > 0; got {fractions}")
    classes: dict[tuple[str, str] | None, list[str]] = {}
    seen: set[str] = set()
    for ex in examples:
        key = normalize(ex.text)
        if ex.judged_labels() and key not in seen:  # a text's first judged row decides its class
            seen.add(key)
            classes.setdefault(stratum(ex, heads), []).append(key)
    assigned: dict[str, Split] = {}
    for texts in classes.values():
        ranked = sorted(texts, key=lambda t: (_hash_rank(t, salt), t))
        test = min(_share(len(ranked), fractions[2]), len(ranked) - 1)  # a class keeps a training row
        validation = min(_share(len(ranked), fractions[1]), len(ranked) - 1 - test)
        train = len(ranked) - test - validation
        for i, text in enumerate(ranked):
            assigned[text] = "train" if i < train else ("validation" if i < train + validation else "test")
    out: dict[Split, list[Example]] = {s: [] for s in SPLITS}
    for ex in examples:
        split = assigned.get(normalize(ex.text), "train")
        if split != "train" and ex.train_only:
            ex = replace(ex, labels=ex.judged_labels(), train_only=())
            if not ex.labels:
                continue  # a training-only copy of a held-out text
        out[split].append(ex)
    return out


def fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_jsonl(examples: Iterable[Example]) -> str:
    return "".join(json.dumps(ex.to_json(), ensure_ascii=False) + "\n" for ex in examples)


def write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(to_jsonl(examples))


def read_jsonl(path: Path) -> list[Example]:
    with open(path, encoding="utf-8") as fh:
        return [Example.from_json(json.loads(line)) for line in fh if line.strip()]

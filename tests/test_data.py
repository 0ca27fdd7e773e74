"""CSV/JSONL import: every bad-input case names file and line; split stability; schema handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from classifier.data import DataError, load_examples, split_examples, split_of
from classifier.schema import LabelSchema, SchemaError
from tests.model_fixtures import learnable_rows, write_csv

HEADER = "text,topic,urgency,sentiment\n"


def _write(tmp_path: Path, body: str | bytes, name: str = "in.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8"))
    return path


def test_reads_quoting_multiline_and_partial_labels(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        HEADER
        + '"She said ""hi"", then left",billing,low,\n"two\nlines",bug,,negative\nok,bug,high,positive\n',
    )
    examples, schema = load_examples([path], LabelSchema())
    assert examples[0].text == 'She said "hi", then left'
    assert examples[0].labels == {"topic": "billing", "urgency": "low"}  # empty cell: no sentiment label
    assert examples[1].text == "two\nlines"
    assert examples[1].labels == {"topic": "bug", "sentiment": "negative"}
    assert schema.head_names == ["topic", "urgency", "sentiment"]


def test_jsonl(tmp_path: Path) -> None:
    lines = [
        {"text": "refund please", "topic": "billing"},
        {"text": "app crashes", "topic": "bug", "urgency": None},
    ]
    path = _write(tmp_path, "\n".join(json.dumps(x) for x in lines) + "\n", "in.jsonl")
    examples, schema = load_examples([path], LabelSchema())
    assert [e.labels for e in examples] == [{"topic": "billing"}, {"topic": "bug"}]
    assert schema.head_names == ["topic"]  # heads absent from the data are left out


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"text,topic\ncaf\xe9 down,outage\n", "in.csv:2: not valid UTF-8"),
        ("message,topic\nhello,billing\n", "in.csv:1: no 'text' column"),
        ("text,topic\nhello,billing\n  ,bug\n", "in.csv:3: empty 'text'"),
        ("text,topic\nhello,billing\nbye,weather\n", "in.csv:3: unknown topic label 'weather'"),
        ("text,topic\n" + "x" * 20_001 + ",billing\nshort,bug\n", "in.csv:2: text is 20,001 characters"),
        ("text,topic\nhello,billing\nagain,billing\n", "head 'topic' has 1 distinct label(s)"),
        ("text,topic\nhello,billing,extra\n", "in.csv:2: expected 2 fields, found 3"),
        ('text,topic\n"unclosed,billing\n', "in.csv:2: malformed CSV"),
        ("", "in.csv:1: the file is empty"),
        ("text,topic\n", "in.csv: no data rows"),
        ("text,colour\nhello,red\n", "in.csv:1: no label column"),
    ],
)
def test_bad_csv_is_rejected_with_file_and_line(tmp_path: Path, body: str | bytes, message: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(DataError) as err:
        load_examples([path], LabelSchema())
    assert message in str(err.value)


def test_line_number_counts_multiline_records(tmp_path: Path) -> None:
    path = _write(tmp_path, 'text,topic\n"a\nb\nc",billing\nok,nonsense\n')
    with pytest.raises(DataError, match=r"in.csv:5: unknown topic label"):
        load_examples([path], LabelSchema())


def test_bad_jsonl_line(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"text": "a", "topic": "bug"}\n{"text": \n', "in.jsonl")
    with pytest.raises(DataError, match=r"in.jsonl:2: invalid JSON"):
        load_examples([path], LabelSchema())


def test_infer_labels_and_custom_text_column(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "b77.csv",
        [
            {"query": "card lost", "topic": "lost_card"},
            {"query": "where is my card", "topic": "card_arrival"},
        ],
    )
    examples, schema = load_examples([path], LabelSchema(), text_column="query", infer_labels=True)
    assert schema.heads == {"topic": ["card_arrival", "lost_card"]}
    assert examples[0].text == "card lost"


def test_schema_file_allows_new_labels_and_rejects_single_label_heads(tmp_path: Path) -> None:
    schema_path = tmp_path / "schema.yaml"
    schema_path.write_text("heads:\n  topic: [billing, bug]\nallow_new_labels: true\n")
    schema = LabelSchema.load(schema_path)
    path = write_csv(
        tmp_path / "a.csv", [{"text": "a", "topic": "billing"}, {"text": "b", "topic": "refunds"}]
    )
    _, used = load_examples([path], schema)
    assert used.heads["topic"] == ["billing", "bug", "refunds"]
    schema_path.write_text("heads:\n  topic: [billing]\n")
    with pytest.raises(SchemaError, match="needs at least 2"):
        LabelSchema.load(schema_path).validate_trainable()


def test_split_is_stable_per_text_and_roughly_80_10_10(tmp_path: Path) -> None:
    rows = learnable_rows(3000)
    examples, _ = load_examples([write_csv(tmp_path / "a.csv", rows)], LabelSchema())
    splits = split_examples(examples)
    shares = {k: len(v) / len(examples) for k, v in splits.items()}
    assert (
        0.77 < shares["train"] < 0.83 and 0.08 < shares["validation"] < 0.12 and 0.08 < shares["test"] < 0.12
    )
    # adding data never moves an existing text to another split
    more, _ = load_examples(
        [write_csv(tmp_path / "b.csv", rows + learnable_rows(500, seed=7))], LabelSchema()
    )
    again = split_examples(more)
    for name, part in splits.items():
        assert {e.text for e in part} <= {e.text for e in again[name]}
    # stratified in expectation: every class has test rows
    for topic in ("billing", "bug", "outage"):
        assert any(e.labels["topic"] == topic for e in splits["test"])
    assert split_of("  Hello   World ") == split_of("hello world")

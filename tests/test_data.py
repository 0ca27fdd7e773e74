"""CSV/JSONL import: every bad-input case names file and line; split stability; schema handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from classifier.data import DataError, Example, load_examples, load_with_own_labels, split_examples
from classifier.schema import LabelSchema, SchemaError
from tests.support.model_fixtures import learnable_rows, write_csv

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
    assert list(schema.heads) == ["topic", "urgency", "sentiment"]


def test_jsonl(tmp_path: Path) -> None:
    lines = [
        {"text": "refund please", "topic": "billing"},
        {"text": "app crashes", "topic": "bug", "urgency": None},
    ]
    path = _write(tmp_path, "\n".join(json.dumps(x) for x in lines) + "\n", "in.jsonl")
    examples, schema = load_examples([path], LabelSchema())
    assert [e.labels for e in examples] == [{"topic": "billing"}, {"topic": "bug"}]
    assert list(schema.heads) == ["topic"]  # heads absent from the data are left out


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"text,topic\ncaf\xe9 down,outage\n", "in.csv:2: not valid UTF-8"),
        ("message,topic\nhello,billing\n", "in.csv:1: no 'text' column"),
        ("topic,body\nbug,the app crashes on start\n", "if the texts are in 'body', pass --text-column body"),
        ("Text,topic\nhello,billing\n", "pass --text-column Text"),
        (
            "text;topic\nhello;billing\n",
            "in.csv:1: no 'text' column in the header; the file looks semicolon-",
        ),
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


def test_split_is_stratified_80_10_10_and_stable_as_data_grows(tmp_path: Path) -> None:
    rows = learnable_rows(3000)
    examples, _ = load_examples([write_csv(tmp_path / "a.csv", rows)], LabelSchema())
    splits = split_examples(examples, heads=["topic"])
    for topic in ("billing", "bug", "outage"):  # every class is cut 80/10/10 to the row
        n = sum(e.labels["topic"] == topic for e in examples)
        sizes = {name: sum(e.labels["topic"] == topic for e in part) for name, part in splits.items()}
        assert sizes["test"] == sizes["validation"] == round(n / 10), (topic, n, sizes)
    # adding data moves only texts next to a cut, and never between train and test
    more, _ = load_examples(
        [write_csv(tmp_path / "b.csv", rows + learnable_rows(500, seed=7))], LabelSchema()
    )
    again = {name: {e.text for e in part} for name, part in split_examples(more, heads=["topic"]).items()}
    before = {name: {e.text for e in part} for name, part in splits.items()}
    assert not before["test"] & again["train"] and not before["train"] & again["test"]
    assert len(before["test"] & again["test"]) >= 0.95 * len(before["test"])
    assert split_examples(more, heads=["topic"])["test"] == split_examples(more, heads=["topic"])["test"]


def test_every_class_gets_validation_and_test_rows_and_copies_share_a_split() -> None:
    common = [Example(f"the invoice {i} is wrong", {"topic": "billing"}) for i in range(50)]
    rare = [Example(f"site {i} is down", {"topic": "outage"}) for i in range(5)]
    copies = [Example("  Hello   World ", {"topic": "billing"}), Example("hello world", {"topic": "outage"})]
    splits = split_examples(common + rare + copies, heads=["topic"])
    where = {e.text: name for name, part in splits.items() for e in part}
    assert where["  Hello   World "] == where["hello world"]  # one text is never on both sides
    rare_where = [where[e.text] for e in rare]
    assert sorted(rare_where) == ["test", "train", "train", "train", "validation"]
    assert split_examples(rare[:2], heads=["topic"])["test"] == []  # two rows: both train


def test_multi_head_rows_are_stratified_by_the_first_head_they_have() -> None:
    topics = [Example(f"refund {i}", {"topic": "billing", "sentiment": "negative"}) for i in range(20)]
    moods = [Example(f"thanks {i}", {"sentiment": "positive"}) for i in range(20)]
    splits = split_examples(topics + moods, heads=["topic", "sentiment"])
    for group in (topics, moods):
        texts = {e.text for e in group}
        assert sum(e.text in texts for e in splits["test"]) == 2


def test_training_only_labels_are_never_held_out() -> None:
    human = [Example(f"card {i} declined", {"topic": "billing"}) for i in range(30)]
    accepted = [
        Example(f"app {i} crashed", {"topic": "bug"}, "slack:accepted:1", train_only=("topic",))
        for i in range(30)
    ]
    mixed = [
        Example(
            f"refund {i} please", {"topic": "billing", "urgency": "low"}, "slack:2", train_only=("urgency",)
        )
        for i in range(30)
    ]
    splits = split_examples(human + accepted + mixed, heads=["topic", "urgency"])
    held_out = splits["validation"] + splits["test"]
    assert not any(e.text.startswith("app") for e in held_out)  # never ranked: always train
    assert all(e.train_only == () and "urgency" not in e.labels for e in held_out)
    assert sum(e.text.startswith("refund") for e in splits["test"]) > 0
    assert all(e.labels.get("urgency") == "low" for e in splits["train"] if e.text.startswith("refund"))
    # and the training-only rows do not shift the human rows' split
    alone = split_examples(human + mixed, heads=["topic", "urgency"])
    assert [e.text for e in alone["test"]] == [e.text for e in splits["test"]]


SHOP = [
    {"text": "I want my money back", "topic": "refund"},
    {"text": "cannot sign in since the update", "topic": "login_problem"},
    {"text": "where is my parcel", "topic": "shipping"},
    {"text": "charged twice for one order", "topic": "billing"},
]


def test_own_labels_are_taken_from_the_data_when_they_clearly_form_a_new_set(tmp_path: Path) -> None:
    shop = write_csv(tmp_path / "shop.csv", SHOP)
    for first_model in (True, False):  # 3 of 4 labels are not starter labels: a new set either way
        examples, schema, inferred = load_with_own_labels([shop], LabelSchema(), first_model=first_model)
        assert inferred == ["topic"] and len(examples) == 4
        assert schema.heads == {"topic": ["billing", "login_problem", "refund", "shipping"]}


def test_own_labels_keep_the_strict_check_for_a_typo_in_the_starter_labels(tmp_path: Path) -> None:
    rows = [
        {"text": f"message {i}", "topic": t} for i, t in enumerate(["billing", "bug", "outage", "biling"])
    ]
    path = write_csv(tmp_path / "typo.csv", rows)
    with pytest.raises(DataError, match=r"typo.csv:5: unknown topic label 'biling'"):
        load_with_own_labels([path], LabelSchema(), first_model=False)
    # with no model yet the data's labels are the model's (and the caller says so)
    _, schema, inferred = load_with_own_labels([path], LabelSchema(), first_model=True)
    assert inferred == ["topic"] and "biling" in schema.heads["topic"]
    # starter labels only: the default schema, in its order, nothing inferred
    known = write_csv(tmp_path / "known.csv", rows[:3])
    _, schema, inferred = load_with_own_labels([known], LabelSchema(), first_model=True)
    assert inferred == [] and schema.heads["topic"] == LabelSchema().heads["topic"]

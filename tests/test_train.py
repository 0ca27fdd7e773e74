"""Training, evaluation and the registry, end to end through the CLI on a tiny random BERT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from bot.cli import app
from classifier.data import Example
from classifier.model import MultiHeadClassifier
from classifier.registry import Registry
from classifier.schema import LabelSchema
from classifier.train import IGNORE, TrainConfig, balanced_class_weights, masked_loss, train
from tests.support.model_fixtures import learnable_rows, write_csv
from tests.support.tiny_model import make_tiny_version

runner = CliRunner()


def _cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_masked_loss_ignores_unlabeled_rows() -> None:
    logits = {
        "topic": torch.randn(4, 3, requires_grad=True),
        "sentiment": torch.randn(4, 2, requires_grad=True),
    }
    labels = {"topic": torch.tensor([0, 1, IGNORE, 2]), "sentiment": torch.full((4,), IGNORE)}
    loss = masked_loss(logits, labels)
    loss.backward()
    assert logits["sentiment"].grad is None or not logits["sentiment"].grad.any()
    assert not logits["topic"].grad[2].any()  # the unlabeled row gives no gradient
    expected = torch.nn.functional.cross_entropy(logits["topic"][[0, 1, 3]], torch.tensor([0, 1, 2]))
    assert torch.isclose(loss, expected)


def test_balanced_class_weights_even_out_a_skewed_sample() -> None:
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, IGNORE])  # class 2 absent, one row unlabeled
    weights = balanced_class_weights(y, 3)
    assert torch.allclose(weights, torch.tensor([8 / (2 * 6), 8 / (2 * 2), 1.0]))
    # each present class now carries the same total weight
    assert torch.isclose(weights[0] * 6, weights[1] * 2)
    logits = {"topic": torch.randn(9, 3)}
    plain = masked_loss(logits, {"topic": y})
    weighted = masked_loss(logits, {"topic": y}, {"topic": weights})
    expected = torch.nn.functional.cross_entropy(logits["topic"][:8], y[:8], weight=weights)
    assert torch.isclose(weighted, expected) and not torch.isclose(weighted, plain)


def test_partially_labeled_files_train_one_joint_model(
    tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    rows = learnable_rows(120)
    topics = write_csv(tmp_path / "topics.csv", [{"text": r["text"], "topic": r["topic"]} for r in rows[:60]])
    moods = write_csv(
        tmp_path / "moods.csv", [{"text": r["text"], "sentiment": r["sentiment"]} for r in rows[60:]]
    )
    out = _cli(
        "train",
        "--data",
        str(topics),
        "--data",
        str(moods),
        "--base-model",
        str(tiny_bert),
        "--epochs",
        "1",
        "--max-steps",
        "3",
        "--json",
    )
    result = json.loads(out)
    model, _, _ = MultiHeadClassifier.load(
        Path(Registry(data_dir / "models").get(result["model_version"]).path)
    )
    assert list(model.heads) == ["topic", "sentiment"]  # urgency is in no file: no head


def test_cli_train_evaluate_registry_and_continue(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "train.csv", learnable_rows(160))
    out = _cli(
        "train",
        "--data",
        str(csv_path),
        "--base-model",
        str(tiny_bert),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--max-length",
        "32",
        "--infer-labels",
    )
    assert "saved v1" in out and "v1 is the active model" in out

    registry = Registry(data_dir / "models")
    v1 = registry.get("v1")
    folder = Path(v1.path)
    for name in (
        "encoder/config.json",
        "tokenizer/tokenizer_config.json",
        "heads.safetensors",
        "model.json",
        "version.json",
        "dataset.jsonl",
        "eval/metrics.json",
        "eval/confusion_topic.png",
        "eval/reliability_topic.png",
        "eval/wrong_predictions.csv",
    ):
        assert (folder / name).is_file(), name
    assert v1.status == "active" and v1.data["files"][0]["sha256"]
    assert v1.train_config["max_length"] == 32 and set(v1.metrics) == {"topic", "urgency", "sentiment"}
    log = [json.loads(line) for line in (data_dir / "runs.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log] == ["start", "epoch", "epoch", "end"]
    assert log[1]["samples_per_s"] > 0 and "val_macro_f1" in log[1]

    # a second version is not activated automatically
    out = _cli(
        "train", "--data", str(csv_path), "--base-model", str(tiny_bert), "--epochs", "1", "--max-steps", "2"
    )
    assert "active model stays v1" in out
    assert registry.active_name() == "v1"

    # continue training from v1 with a label the parent did not know: heads grow, known rows are kept
    extra = learnable_rows(160) + [
        {
            "text": f"please add dark mode {i}",
            "topic": "feature_request",
            "urgency": "low",
            "sentiment": "positive",
        }
        for i in range(20)
    ]
    extra_path = write_csv(tmp_path / "more.csv", extra)
    _cli(
        "train",
        "--data",
        str(extra_path),
        "--from-version",
        "v1",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--infer-labels",
    )
    v3 = registry.get("v3")
    assert v3.parent == "v1"
    assert v1.schema["heads"]["topic"] == ["billing", "bug", "outage"]
    assert v3.schema["heads"]["topic"] == ["billing", "bug", "outage", "feature_request"]

    out = _cli("models", "list")
    assert "* v1" in out and "v3" in out
    # each figure says how many held-out rows it rests on, and a handful per class is called out
    assert (
        f"topic: acc {v1.metrics['topic']['accuracy']:.3f}" in out
        and f"(n={v1.metrics['topic']['n']})" in out
    )
    assert v1.metrics["topic"]["min_support"] < 10 and "topic: too few rows to judge" in out
    _cli("models", "activate", "v3")
    assert registry.active_name() == "v3" and registry.get("v1").status == "retired"


def test_training_learns_and_early_stopping_keeps_best(tiny_bert: Path, data_dir: Path) -> None:
    examples = [Example(text=r["text"], labels={"topic": r["topic"]}) for r in learnable_rows(240)]
    schema = LabelSchema(heads={"topic": ["billing", "bug", "outage"]})
    registry = Registry(data_dir / "models")
    config = TrainConfig(
        base_model=str(tiny_bert), epochs=6, learning_rate=2e-3, batch_size=16, max_length=24, patience=2
    )
    result = train(examples, schema, config, registry, progress=False)
    assert result.report["heads"]["topic"]["accuracy"] >= 0.9
    # a temperature fitted on the validation split is kept with the version and judged on the test split
    temperature = registry.get(result.version.name).temperatures["topic"]
    assert temperature != 1.0 and result.report["heads"]["topic"]["temperature"] == temperature
    assert {"ece", "ece_uncalibrated"} <= set(result.version.metrics["topic"])
    assert result.version.data["best_epoch"] == max(
        range(1, len(result.history) + 1), key=lambda e: result.history[e - 1]["val_macro_f1"]
    )

    stalled = TrainConfig(
        base_model=str(tiny_bert), epochs=10, learning_rate=1e-12, patience=1, max_length=24
    )
    result = train(examples, schema, stalled, registry, progress=False)
    assert len(result.history) == 2  # stops after one epoch without gain


def test_bad_input_leaves_registry_untouched(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("text,topic\nhello,billing\n  ,bug\n", encoding="utf-8")
    result = runner.invoke(app, ["train", "--data", str(bad), "--base-model", str(tiny_bert)])
    assert result.exit_code == 2 and "bad.csv:3: empty 'text'" in result.output
    good = write_csv(tmp_path / "good.csv", learnable_rows(40))
    result = runner.invoke(
        app, ["train", "--data", str(good), "--base-model", str(tiny_bert), "--max-length", "600"]
    )
    assert result.exit_code != 0
    result = runner.invoke(app, ["train", "--data", str(good), "--base-model", str(tmp_path)])
    assert result.exit_code == 2 and "not a Hugging Face model folder" in result.output
    registry = Registry(data_dir / "models")
    assert registry.names() == [] and not list(registry.root.glob(".staging-*"))


def test_evaluate_json_prints_exactly_one_object(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "train.csv", learnable_rows(60))
    _cli(
        "train", "--data", str(csv_path), "--base-model", str(tiny_bert), "--epochs", "1", "--max-steps", "2"
    )
    test_csv = write_csv(
        tmp_path / "test.csv", [{"text": r["text"], "topic": r["topic"]} for r in learnable_rows(30, 3)]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bot.cli", "evaluate", "--data", str(test_csv), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "TRIAGE_DATA_DIR": str(data_dir)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # fails if anything else is on stdout
    assert report["model_version"] == "v1"
    assert list(report["heads"]) == ["topic"]  # heads absent from the data are left out
    head = report["heads"]["topic"]
    assert head["n"] == 30 and all(0 <= head[k] <= 1 for k in ("accuracy", "macro_f1", "macro_recall"))
    assert sum(map(sum, head["confusion_matrix"]["matrix"])) == 30


@pytest.mark.parametrize(
    "flag",
    [["--max-length", "2"], ["--split", "80/10"], ["--batch-size", "0"], ["--class-weighting", "inverse"]],
)
def test_bad_settings_are_refused(flag: list[str], tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    good = write_csv(tmp_path / "good.csv", learnable_rows(40))
    result = runner.invoke(app, ["train", "--data", str(good), "--base-model", str(tiny_bert), *flag])
    assert result.exit_code == 2


def test_activating_a_version_with_fewer_heads_warns_and_asks(tiny_bert: Path, data_dir: Path) -> None:
    registry = Registry(data_dir / "models")
    make_tiny_version(registry, tiny_bert)  # v1, active: topic, urgency, sentiment
    make_tiny_version(registry, tiny_bert, LabelSchema(heads={"topic": ["billing", "bug"]}), activate=False)

    declined = runner.invoke(app, ["models", "activate", "v2"], input="n\n")
    assert declined.exit_code == 1
    assert "v2 lacks head(s) the active v1 has: urgency, sentiment" in declined.stderr
    assert "without urgency: escalation" in declined.stderr
    assert registry.active_name() == "v1"

    result = runner.invoke(app, ["models", "activate", "v2", "--yes"])
    assert result.exit_code == 0, result.output
    assert registry.active_name() == "v2"
    # back to a version with every head: nothing to confirm
    result = runner.invoke(app, ["models", "activate", "v1"], input="")
    assert result.exit_code == 0, result.output
    assert "lacks" not in result.stderr and registry.active_name() == "v1"


SHOP = {
    "refund": ["I want my money back", "please refund order", "return and refund"],
    "login_problem": ["cannot sign in", "password reset fails", "locked out of account"],
    "shipping": ["where is my parcel", "delivery is late", "tracking number missing"],
}


def _shop_csv(path: Path, extra: dict[str, str] | None = None) -> Path:
    rows = [
        {"text": f"{text} ({i})", "topic": topic}
        for i in range(8)
        for topic, texts in SHOP.items()
        for text in texts
    ]
    return write_csv(path, rows + ([extra] if extra else []))


def test_own_labels_train_the_first_model_and_a_given_schema_stays_strict(
    tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    shop = _shop_csv(tmp_path / "shop.csv")
    quick = ["--base-model", str(tiny_bert), "--epochs", "1", "--max-steps", "1"]
    result = runner.invoke(app, ["train", "--data", str(shop), *quick])
    assert result.exit_code == 0, result.output
    assert "labels taken from the data (no model in" in result.stderr
    assert "topic = login_problem, refund, shipping" in result.stderr
    registry = Registry(data_dir / "models")
    assert registry.get("v1").schema["heads"] == {"topic": ["login_problem", "refund", "shipping"]}

    # against an existing schema the check stays strict: the parent's when continuing, or --schema
    more = _shop_csv(tmp_path / "more.csv", {"text": "is this under warranty", "topic": "warranty"})
    result = runner.invoke(app, ["train", "--data", str(more), "--from-version", "v1", "--max-steps", "1"])
    assert result.exit_code == 2 and "unknown topic label 'warranty'" in result.output
    schema = tmp_path / "schema.yaml"
    schema.write_text("heads:\n  topic: [refund, login_problem, shipping]\n")
    result = runner.invoke(app, ["train", "--data", str(more), "--schema", str(schema), *quick])
    assert result.exit_code == 2 and "more.csv:74: unknown topic label 'warranty'" in result.output
    assert registry.names() == ["v1"]


def test_training_defaults_are_the_best_measured_and_max_length_can_follow_the_data(
    tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    config = TrainConfig()  # bench/accuracy.py's best for all-MiniLM-L6-v2
    assert (config.max_length, config.batch_size, config.learning_rate, config.head_learning_rate) == (
        64,
        32,
        1e-4,
        1e-3,
    )
    rows = learnable_rows(60)
    long_rows = [{**r, "text": r["text"] + " and more words" * 12} for r in rows]  # about 60 tokens each
    path = write_csv(tmp_path / "long.csv", long_rows)
    quick = ["--base-model", str(tiny_bert), "--epochs", "1", "--max-steps", "1", "--infer-labels"]
    out = _cli("train", "--data", str(path), "--max-length", "auto", *quick)
    assert "max length 64 tokens (auto" in out
    out = _cli("train", "--data", str(path), "--max-length", "16", *quick)
    assert "are longer than 16 tokens and are cut; --max-length auto would use 64" in out
    registry = Registry(data_dir / "models")
    assert [registry.get(v).train_config["max_length"] for v in ("v1", "v2")] == [64, 16]
    result = runner.invoke(app, ["train", "--data", str(path), "--max-length", "long", *quick])
    assert result.exit_code == 2 and "--max-length must be a number of tokens or auto" in result.output


def test_evaluate_says_which_rows_it_left_out_and_averages_over_classes_present(
    tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    _cli(
        "train",
        "--data",
        str(write_csv(tmp_path / "train.csv", learnable_rows(60))),
        "--base-model",
        str(tiny_bert),
        "--max-steps",
        "1",
    )
    known = [{"text": r["text"], "topic": r["topic"]} for r in learnable_rows(4, seed=3)]
    unknown = [{"text": f"{label} question {i}", "topic": label} for label in SHOP for i in range(4)]
    path = write_csv(tmp_path / "shop_test.csv", known + unknown)
    out = _cli("evaluate", "--data", str(path))
    assert "[topic] n=4 " in out
    assert (
        "12 row(s) left out: labels this model does not know (refund 4, login_problem 4, shipping 4)" in out
    )
    assert "warning: too few rows to judge" in out
    assert "calibration: temperature " in out and "confidence ≥ 0.5: " in out
    result = runner.invoke(app, ["evaluate", "--data", str(path), "--json"])
    report = json.loads(result.stdout)
    assert report["left_out"] == {"topic": {"refund": 4, "login_problem": 4, "shipping": 4}}
    assert "12 row(s) left out" in result.stderr


def test_macro_averages_cover_only_the_classes_in_the_data() -> None:
    from classifier.evaluate import head_metrics

    y_true = np.array([0, 0, 1, 1])  # no row of class 2
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    m = head_metrics(y_true, probs, ["billing", "bug", "outage"])
    assert m["macro_recall"] == pytest.approx((0.5 + 1.0) / 2)  # outage's row-less 0 is not averaged in
    assert m["classes"] == 2 and m["min_support"] == 2 and m["per_class"]["outage"]["support"] == 0


def test_the_too_few_rows_warning_starts_under_ten_per_class() -> None:
    from classifier.evaluate import too_few_rows

    assert too_few_rows({"n": 30, "classes": 3, "min_support": 10}) is None
    warning = too_few_rows({"n": 29, "classes": 3, "min_support": 9})
    assert warning is not None and "29 in all, 9 in the smallest of 3 classes" in warning


def test_help_reads_plainly() -> None:
    def help_of(*command: str) -> str:
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
        assert result.exit_code == 0, result.output
        return result.output

    inspect = help_of("data", "inspect")
    assert "Usage: triage data inspect [OPTIONS] FILE..." in inspect and "{files}" not in inspect
    train_help = help_of("train")
    assert "<bool>" not in train_help and "<bool>" not in help_of()
    assert "<path>" in train_help and "list[" not in train_help  # --data: one file each time
    assert "[default: (the packaged all-MiniLM-L6-v2)]" in train_help
    assert "Log debug messages too." in help_of("bot")
    assert "Print the versions as one JSON list." in help_of("models", "list")

    # every command, however deep: a description for each option and argument, no <bool>, no {name}
    def commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from commands(sub, (*path, name))

    walked = list(commands(typer.main.get_command(app)))
    assert len(walked) > 20  # every group was walked: train ... messages retry
    for path, command in walked:
        undescribed = [p.name for p in command.params if not (getattr(p, "help", None) or "").strip()]
        assert undescribed == [], f"triage {' '.join(path)}: no description for {undescribed}"
        text = help_of(*path)
        usage = next(line for line in text.splitlines() if "Usage:" in line)
        assert "<bool>" not in text and "{" not in usage, f"triage {' '.join(path)}:\n{text}"
        assert "list[" not in text, f"triage {' '.join(path)}: a repeatable option shows its Python type"
        assert "``" not in text, f"triage {' '.join(path)}: reStructuredText markup in the help"

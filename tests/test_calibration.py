"""Calibrated confidence: temperature scaling, ECE, and the one place served and judged probabilities
are scaled (the engine on both backends, evaluation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from classifier.calibration import (
    MIN_FIT_ROWS,
    accuracy_by_confidence,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    fit_temperatures,
)
from classifier.data import Example
from classifier.engine import Engine
from classifier.evaluate import evaluate_version, probabilities
from classifier.model import MultiHeadClassifier
from classifier.registry import Registry
from classifier.schema import LabelSchema
from tests.support.serving import (  # noqa: F401 (fixtures)
    TEXTS,
    engine_config,
    registry_fixture,
    registry_template_fixture,
    tiny_base_fixture,
)


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits), dim=-1).numpy()


def _miscalibrated(rows: int, true_temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A model's softmax(z) whose labels really follow softmax(z / true_temperature)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(rows, 5))
    truth_probs = _softmax(logits / true_temperature)
    truth = np.array([rng.choice(5, p=p / p.sum()) for p in truth_probs])
    return _softmax(logits).astype(np.float32), truth


def test_scaling_probabilities_equals_scaling_logits_and_keeps_the_label() -> None:
    logits = np.random.default_rng(0).normal(0, 4, size=(50, 7))
    probs = {"topic": _softmax(logits).astype(np.float32), "sentiment": _softmax(logits[:, :3])}
    scaled = calibrate(probs, {"topic": 2.5})
    assert np.allclose(scaled["topic"], _softmax(logits / 2.5), atol=1e-6)
    assert scaled["sentiment"] is probs["sentiment"]  # no temperature: untouched
    assert (scaled["topic"].argmax(1) == probs["topic"].argmax(1)).all()
    assert scaled["topic"].dtype == np.float32
    # a probability that underflowed to 0 stays a valid distribution
    assert np.allclose(calibrate({"h": np.array([[1.0, 0.0]])}, {"h": 3.0})["h"].sum(), 1.0)


@pytest.mark.parametrize("true_temperature", [0.4, 2.0])
def test_the_fitted_temperature_recovers_the_true_one_and_lowers_held_out_ece(
    true_temperature: float,
) -> None:
    probs, truth = _miscalibrated(4000, true_temperature, seed=1)
    fitted = fit_temperature(probs, truth)
    assert fitted == pytest.approx(true_temperature, rel=0.1)

    held_out, held_truth = _miscalibrated(4000, true_temperature, seed=2)
    scaled = calibrate({"h": held_out}, {"h": fitted})["h"]
    before = expected_calibration_error(held_out.max(1), held_out.argmax(1) == held_truth)
    after = expected_calibration_error(scaled.max(1), scaled.argmax(1) == held_truth)
    assert before > 0.05 and after < 0.03


def test_fit_uses_each_heads_labeled_rows_and_needs_enough_of_them() -> None:
    schema = LabelSchema(heads={"topic": ["a", "b"], "urgency": ["low", "high"]})
    rows = 60
    examples = [Example(text=str(i), labels={"topic": "a" if i % 2 else "b"}) for i in range(rows)]
    examples += [Example(text="u", labels={"urgency": "low"})] * (MIN_FIT_ROWS - 1)
    n = len(examples)
    # the topic head is right on every row but unsure: it should be sharpened (T < 1)
    topic = np.tile([0.4, 0.6], (n, 1)).astype(np.float32)
    topic[1::2] = [0.6, 0.4]
    probs = {"topic": topic, "urgency": np.tile([0.5, 0.5], (n, 1)).astype(np.float32)}
    temperatures = fit_temperatures(schema, examples, probs)
    assert temperatures["urgency"] == 1.0  # too few labeled rows to fit
    assert 0 < temperatures["topic"] < 0.5


def test_accuracy_on_each_side_of_the_unsure_threshold() -> None:
    confidence = np.array([0.9, 0.8, 0.3, 0.2, 0.5])
    correct = np.array([1.0, 0.0, 0.0, 0.0, 1.0])
    split = accuracy_by_confidence(confidence, correct, 0.5)
    assert split == {
        "threshold": 0.5,
        "sure_n": 3,
        "sure_accuracy": pytest.approx(2 / 3),
        "unsure_n": 2,
        "unsure_accuracy": 0.0,
    }
    assert accuracy_by_confidence(confidence, correct, 0.0)["unsure_accuracy"] is None


def _set_temperatures(registry: Registry, name: str, temperatures: dict[str, float]) -> None:
    path = Path(registry.get(name).path) / "version.json"
    raw = json.loads(path.read_text())
    raw["temperatures"] = temperatures
    path.write_text(json.dumps(raw))


def test_a_version_without_temperatures_loads_and_serves_raw_softmax(registry: Registry) -> None:
    path = Path(registry.get("v1").path) / "version.json"
    raw = json.loads(path.read_text())
    raw.pop("temperatures", None)  # as written before calibration existed
    path.write_text(json.dumps(raw))
    assert registry.get("v1").temperatures == {}


@pytest.mark.parametrize("backend", ["torch", "onnx"])
async def test_engine_and_evaluation_serve_and_judge_the_calibrated_probabilities(
    registry: Registry, backend: Any
) -> None:
    temperatures = {"topic": 0.25, "sentiment": 3.0}  # urgency: none, raw softmax
    _set_temperatures(registry, "v1", temperatures)
    info = registry.get("v1")
    model, tokenizer, max_length = MultiHeadClassifier.load(Path(info.path))
    raw = probabilities(model, tokenizer, TEXTS[:4], max_length)
    expected = calibrate(raw, temperatures)

    async with Engine(registry, engine_config(backend=backend, quantize="none")) as engine:
        result = await engine.classify(TEXTS[:4])
    for row, text_result in enumerate(result.results):
        for head, prediction in text_result.heads.items():
            labels = model.schema.heads[head]
            served = np.array([prediction.scores[label] for label in labels])
            assert np.allclose(served, expected[head][row], atol=1e-4), head
            assert prediction.confidence == pytest.approx(float(expected[head][row].max()), abs=1e-4)
    assert not np.allclose(expected["topic"], raw["topic"], atol=1e-3)

    examples = [
        Example(text=text, labels={"topic": model.schema.heads["topic"][i % 3]})
        for i, text in enumerate(TEXTS[:12])
    ]
    raw_all = probabilities(model, tokenizer, [ex.text for ex in examples], max_length)["topic"]
    scaled_all = calibrate({"topic": raw_all}, temperatures)["topic"]
    threshold = float(np.median(scaled_all.max(1)))
    report = evaluate_version(info, examples, backend=backend, quantize="none", unsure_below=threshold)
    topic = report["heads"]["topic"]
    assert topic["temperature"] == 0.25
    assert topic["mean_confidence"] == pytest.approx(float(scaled_all.max(1).mean()), abs=1e-4)
    assert topic["mean_confidence_uncalibrated"] == pytest.approx(float(raw_all.max(1).mean()), abs=1e-4)
    sure = int((scaled_all.max(1) >= threshold).sum())
    assert 0 < sure < len(examples)
    assert topic["by_confidence"]["sure_n"] == sure
    assert topic["by_confidence"]["unsure_n"] == len(examples) - sure

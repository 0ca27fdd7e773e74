"""The ONNX Runtime backend on tiny models: the same results as PyTorch, int8 only where it keeps the
held-out accuracy, the ONNX files made once per version and never on the event loop, the settings checked
at start-up, and evaluation and the promotion gate on the serving backend."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import classifier.evaluate as evaluate_module
import classifier.onnx_backend as onnx_backend
from bot.cli import app
from bot.retrain import Gate, _train_and_judge_sync
from bot.settings import SettingsError
from bot.settings import load_settings as load_bot_settings
from classifier.data import Example, read_jsonl
from classifier.engine import Engine, EngineConfig
from classifier.evaluate import evaluate_version
from classifier.model import MultiHeadClassifier, predict_probs, torch_runner
from classifier.onnx_backend import (
    OnnxModel,
    ensure_onnx,
    heldout_examples,
    onnx_folder,
    resolve_backend,
)
from classifier.registry import Registry
from classifier.schema import LabelSchema
from classifier.server import ConfigError, load_settings
from classifier.train import TrainConfig, train
from tests.support.model_fixtures import learnable_rows, write_csv
from tests.support.serving import (  # noqa: F401 (fixtures)
    TEXTS,
    copy_registry,
    engine_config,
    registry_fixture,
    registry_template_fixture,
    tiny_base_fixture,
)

SCHEMA = LabelSchema(heads={"topic": ["billing", "bug", "outage"], "sentiment": ["negative", "positive"]})


@pytest.fixture(scope="module")
def trained_template(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """v1 trained on learnable rows (confident predictions, a held-out split); no ONNX files yet."""
    registry = Registry(tmp_path_factory.mktemp("trained") / "models")
    rows = learnable_rows(240)
    examples = [
        Example(r["text"], {"topic": r["topic"], "sentiment": r["sentiment"]}, f"base:{i}")
        for i, r in enumerate(rows)
    ]
    config = TrainConfig(
        base_model=str(tiny_base), epochs=4, learning_rate=2e-3, batch_size=16, max_length=24, patience=0
    )
    train(examples, SCHEMA, config, registry, progress=False)
    return registry.root


@pytest.fixture
def trained(tmp_path: Path, trained_template: Path) -> Registry:
    return copy_registry(trained_template, tmp_path / "models")


def test_int8_keeps_the_labels_and_the_check_is_recorded_with_the_version(
    trained: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    info = trained.active()
    with caplog.at_level(logging.DEBUG):
        report = ensure_onnx(info)
    quantizer = [r for r in caplog.records if "onnxruntime" in r.pathname]
    chatter = [r.getMessage() for r in quantizer if r.levelno < logging.WARNING]  # its warnings may show
    assert chatter == []  # the quantizer's per-tensor lines would land in `triage up`'s output
    assert any("made the ONNX files" in r.getMessage() for r in caplog.records)  # ours stay
    heldout = heldout_examples(info)
    assert report.heldout_rows == len(heldout) > 10
    assert set(report.accuracy) == {"fp32", "int8"} and set(report.accuracy["int8"]) == {"topic", "sentiment"}
    assert report.max_accuracy_drop is not None and report.max_accuracy_drop <= 0.005 and report.int8_ok
    recorded = json.loads((onnx_folder(Path(info.path)) / "report.json").read_text(encoding="utf-8"))
    assert recorded["int8_ok"] is True and recorded["heldout_rows"] == report.heldout_rows

    model, tokenizer, max_length = MultiHeadClassifier.load(Path(info.path))
    texts = [ex.text for ex in heldout] + TEXTS
    cpu = torch.device("cpu")
    torch_probs = predict_probs(torch_runner(model, cpu), model.schema, tokenizer, texts, max_length, cpu)
    folder = onnx_folder(Path(info.path))
    fp32 = OnnxModel(folder, "fp32", model.schema).predict_probs(tokenizer, texts, max_length)
    int8 = OnnxModel(folder, "int8", model.schema).predict_probs(tokenizer, texts, max_length)
    for head in SCHEMA.heads:
        np.testing.assert_allclose(fp32[head], torch_probs[head], atol=1e-4)
        agree = (int8[head].argmax(1) == torch_probs[head].argmax(1)).mean()
        assert agree >= 0.9, f"{head}: int8 agrees with fp32 on {agree:.0%} of rows"


async def test_int8_is_served_by_default_only_when_its_check_passed(
    trained: Registry, tmp_path: Path, trained_template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Engine(trained, engine_config()) as engine:  # auto: onnx on the CPU, int8 if it passed
        assert engine.current is not None and engine.current.backend == "onnx-int8"
    # a version whose int8 check fails (here: no loss at all is allowed, and int8 moves some probability)
    strict = copy_registry(trained_template, tmp_path / "strict")
    monkeypatch.setattr(onnx_backend, "MAX_INT8_ACCURACY_DROP", -1.0)
    async with Engine(strict, engine_config()) as engine:
        assert engine.current is not None and engine.current.backend == "onnx-fp32"
        result = await engine.classify(["refund refund great thanks"])
    assert not ensure_onnx(strict.active()).int8_ok
    assert result.results[0].heads["topic"].label == "billing"
    async with Engine(strict, engine_config(quantize="int8")) as engine:  # asked for explicitly
        assert engine.current is not None and engine.current.backend == "onnx-int8"


async def test_onnx_files_are_made_once_off_the_event_loop(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in registry.names():  # the template has them: start from a version without
        shutil.rmtree(onnx_folder(Path(registry.get(name).path)))
    (Path(registry.get("v1").path) / ".onnx-killed").mkdir()  # what an export killed midway leaves
    exports: list[int] = []
    export = onnx_backend._export

    def spy_export(*args: Any) -> None:
        exports.append(threading.get_ident())
        export(*args)

    monkeypatch.setattr(onnx_backend, "_export", spy_export)
    loop_thread = threading.get_ident()
    # two engines (as two processes would) load the same version at once: one export, under the lock
    async with Engine(registry, engine_config()) as first, Engine(registry, engine_config()) as second:
        await asyncio.gather(first.classify(TEXTS), second.classify(TEXTS))
        assert len(exports) == 1 and loop_thread not in exports
        await first.swap_to("v2")
        await first.swap_to("v1")  # cached in the version folder: not made again
    assert len(exports) == 2
    _check_onnx_files(registry)


def _check_onnx_files(registry: Registry) -> None:
    for name in registry.names():
        folder = Path(registry.get(name).path)
        assert sorted(p.name for p in onnx_folder(folder).iterdir()) == [
            "fp32.onnx",
            "int8.onnx",
            "report.json",
        ]
        assert not list(folder.glob(".onnx-*")), "no scratch folder left behind"
    assert not ensure_onnx(registry.active()).int8_ok  # no held-out split to check int8 on: fp32


def test_backend_settings_are_validated_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        EngineConfig(backend="tensorflow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quantize must be one of"):
        EngineConfig(quantize="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_backend("onnx", "auto", torch.device("cuda"))
    with pytest.raises(ValueError, match="needs the onnx backend"):
        resolve_backend("torch", "int8", torch.device("cpu"))
    assert resolve_backend("auto", "auto", torch.device("cpu")) == "onnx"
    assert resolve_backend("auto", "auto", torch.device("cuda")) == "torch"
    with pytest.raises(ConfigError, match="CLASSIFIER_BACKEND"):
        load_settings(no_auth=True, backend="tensorflow")
    monkeypatch.setenv("CLASSIFIER_QUANTIZE", "int4")
    with pytest.raises(ConfigError, match="CLASSIFIER_QUANTIZE"):
        load_settings(no_auth=True)
    bot = {"_env_file": None, "slack_bot_token": "xoxb-1-2", "slack_signing_secret": "s3cret"}
    with pytest.raises(SettingsError, match="CLASSIFIER_QUANTIZE: Input should be 'auto', 'none' or 'int8'"):
        load_bot_settings(**bot)
    monkeypatch.setenv("CLASSIFIER_QUANTIZE", "int8")
    assert load_settings(no_auth=True).engine_config().quantize == "int8"
    assert load_bot_settings(**bot).classifier_quantize == "int8"


def test_evaluation_runs_on_the_serving_backend(trained: Registry) -> None:
    info = trained.active()
    heldout = heldout_examples(info)
    reports = {
        name: evaluate_version(info, heldout, backend, quantize)
        for name, (backend, quantize) in {
            "torch": ("torch", "auto"),
            "onnx-fp32": ("onnx", "none"),
            "onnx-int8": ("onnx", "int8"),
        }.items()
    }
    for head in SCHEMA.heads:
        torch_head, fp32_head = reports["torch"]["heads"][head], reports["onnx-fp32"]["heads"][head]
        assert fp32_head["accuracy"] == torch_head["accuracy"]
        assert fp32_head["mean_confidence"] == pytest.approx(torch_head["mean_confidence"], abs=1e-5)
        assert abs(reports["onnx-int8"]["heads"][head]["accuracy"] - torch_head["accuracy"]) <= 0.005


def test_triage_evaluate_runs_on_the_chosen_backend(
    trained: Registry, data_dir: Path, tmp_path: Path
) -> None:
    shutil.copytree(trained.root, data_dir / "models")
    data = write_csv(
        tmp_path / "test.csv", [{"text": r["text"], "topic": r["topic"]} for r in learnable_rows(40, 3)]
    )
    reports = {}
    for backend in ("torch", "onnx"):
        result = CliRunner().invoke(
            app, ["evaluate", "--data", str(data), "--json", "--backend", backend, "--quantize", "none"]
        )
        assert result.exit_code == 0, result.output
        reports[backend] = json.loads(result.stdout)["heads"]["topic"]
    assert onnx_folder(data_dir / "models" / "v1").is_dir()  # made for the onnx run
    assert reports["onnx"]["accuracy"] == reports["torch"]["accuracy"]
    assert reports["onnx"]["mean_confidence"] == pytest.approx(reports["torch"]["mean_confidence"], abs=1e-5)
    result = CliRunner().invoke(
        app, ["evaluate", "--data", str(data), "--backend", "torch", "--quantize", "int8"]
    )
    assert result.exit_code == 2 and "int8 quantization needs the onnx backend" in result.output


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_the_gate_judges_both_models_on_the_serving_backend(
    trained: Registry, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    judged: list[tuple[str, str]] = []
    load = evaluate_module.load_onnx

    def spy_load(info: Any, quantize: Any, threads: int | None = None) -> Any:
        judged.append((info.name, quantize))
        return load(info, quantize, threads)

    monkeypatch.setattr(evaluate_module, "load_onnx", spy_load)
    active = trained.active()
    examples = read_jsonl(Path(active.path) / "dataset.jsonl")
    outcome = _train_and_judge_sync(trained, active, examples, Gate(backend=backend), 1, lambda _: None)
    # auto on the CPU: the ONNX Runtime engine serves, int8 where its check passed; so both are judged so
    assert judged == ([(outcome.candidate, "auto"), ("v1", "auto")] if backend == "auto" else [])
    assert onnx_folder(Path(trained.get(outcome.candidate).path)).is_dir() == (backend == "auto")

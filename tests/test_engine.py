"""Engine: batching equals unbatched inference, work stays off the event loop, bounded queue, hot swap."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import classifier.engine as engine_module
from classifier.data import Example
from classifier.engine import (
    Engine,
    EngineConfig,
    EngineError,
    EngineNotReady,
    EngineOverloaded,
)
from classifier.evaluate import evaluate, probabilities
from classifier.model import ModelLoadError, MultiHeadClassifier, micro_batches
from classifier.onnx_backend import load_onnx
from classifier.registry import Registry, RegistryError
from classifier.results import MAX_CHARS, MAX_TEXTS, ClassifierUnavailable, InvalidInput
from tests.support.serving import (  # noqa: F401 (fixtures)
    TEXTS,
    assert_heads_match,
    engine_config,
    gate_worker,
    reference,
    registry_fixture,
    registry_template_fixture,
    tiny_base_fixture,
)
from tests.support.waiting import eventually


def _as_json(result: Any) -> list[dict[str, Any]]:
    return [{head: asdict(p) for head, p in r.heads.items()} for r in result.results]


def _check(result: Any, texts: list[str], expected: list[dict[str, Any]]) -> None:
    assert len(result.results) == len(texts)
    for text_result, heads, ref in zip(result.results, _as_json(result), expected, strict=True):
        assert_heads_match(heads, ref)
        assert text_result.truncated == ref["truncated"]


@pytest.mark.parametrize("backend", ["torch", "onnx"])
async def test_concurrent_results_equal_unbatched_inference(registry: Registry, backend: Any) -> None:
    expected = reference(registry, "v1", TEXTS)  # PyTorch in float32
    rng = random.Random(0)
    calls = [rng.sample(range(len(TEXTS)), rng.randint(1, 4)) for _ in range(60)]
    async with Engine(registry, engine_config(max_wait_ms=10, backend=backend, quantize="none")) as engine:
        assert (
            engine.current is not None
            and engine.current.backend == {"torch": "torch", "onnx": "onnx-fp32"}[backend]
        )
        results = await asyncio.gather(*(engine.classify([TEXTS[i] for i in idx]) for idx in calls))
        stats = engine.stats
    for idx, result in zip(calls, results, strict=True):
        assert result.model_version == "v1"
        _check(result, [TEXTS[i] for i in idx], [expected[i] for i in idx])
    assert expected[TEXTS.index("billing " * 80)]["truncated"], "the long text must exercise truncation"
    assert stats.max_batch_texts > 4, "concurrent calls should share forward passes"
    assert stats.batches < len(calls)


async def test_micro_batches_respect_the_token_budget(registry: Registry) -> None:
    texts = [("word " * n).strip() for n in range(1, 60)]
    async with Engine(registry, engine_config(max_batch_tokens=128, max_wait_ms=20)) as engine:
        await asyncio.gather(*(engine.classify([t]) for t in texts))
        assert 0 < engine.stats.max_padded_tokens <= 128
        assert engine.stats.max_batch_texts > 1


@pytest.mark.parametrize("backend", ["torch", "onnx"])
async def test_evaluation_computes_exactly_what_the_engine_serves(registry: Registry, backend: Any) -> None:
    """The retraining gate judges what users get: evaluation's probabilities equal the engine's, bit for
    bit, for the same texts seen together (one tokenization, micro-batching, padding and runner)."""
    info = registry.get("v1")
    device = "cpu" if backend == "onnx" else "auto"  # torch: on CUDA (bf16) where there is one
    async with Engine(registry, engine_config(device=device, backend=backend, quantize="none")) as engine:
        served = await engine.classify(TEXTS)
        assert engine.stats.batches > 1, "the texts must span several micro-batches"
    model, tokenizer, max_length = MultiHeadClassifier.load(info.files.folder)
    onnx = load_onnx(info, "none") if backend == "onnx" else None
    evaluated = probabilities(model.to(engine.device), tokenizer, TEXTS, max_length, onnx=onnx)
    labels = model.schema.heads
    for row, result in enumerate(served.results):
        for head, prediction in result.heads.items():
            assert prediction.scores == dict(zip(labels[head], evaluated[head][row].tolist(), strict=True))
    # evaluate() itself reports from those probabilities
    examples = [Example(text, {"topic": labels["topic"][i % 2]}) for i, text in enumerate(TEXTS)]
    report = evaluate(model, tokenizer, examples, max_length, device=engine.device, onnx=onnx)
    confidence = np.mean([r.heads["topic"].confidence for r in served.results])
    assert report["heads"]["topic"]["mean_confidence"] == pytest.approx(confidence, abs=1e-7)


def test_micro_batches_sort_by_length_and_split() -> None:
    lengths = [10, 3, 7, 3, 50]
    batches = micro_batches(lengths, max_tokens=21)
    assert [i for b in batches for i in b] == [1, 3, 2, 0, 4]
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 21 or len(batch) == 1


async def test_tokenization_and_forward_never_run_on_the_event_loop(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    tokenize, forward = engine_module.tokenize, engine_module._forward

    def spy_tokenize(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return tokenize(*args, **kwargs)

    def spy_forward(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine_module, "tokenize", spy_tokenize)
    monkeypatch.setattr(engine_module, "_forward", spy_forward)
    loop_thread = threading.get_ident()
    async with Engine(registry, engine_config()) as engine:
        await asyncio.gather(*(engine.classify([t]) for t in TEXTS))
        await engine.swap_to("v2")  # loading and warm-up too
        await engine.classify(TEXTS[:2])
    assert threads and loop_thread not in threads


async def test_full_queue_raises_overloaded_with_retry_after(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Engine(registry, engine_config(queue_size=MAX_TEXTS)) as engine:
        with gate_worker(monkeypatch) as gate:
            first = asyncio.create_task(engine.classify(["held in the forward pass"]))
            await asyncio.to_thread(gate.entered.wait, 5)
            assert engine.queue_depth == 0
            fills = asyncio.create_task(engine.classify(["queued"] * MAX_TEXTS))
            await asyncio.sleep(0.01)
            assert engine.queue_depth == MAX_TEXTS
            with pytest.raises(EngineOverloaded) as excinfo:
                await engine.classify(["one too many"])
            assert isinstance(excinfo.value, ClassifierUnavailable)
            assert excinfo.value.retry_after_s is not None and excinfo.value.retry_after_s >= 1
            gate.release()
            assert (await first).model_version == "v1"
            assert len((await fills).results) == MAX_TEXTS
        assert engine.queue_depth == 0
        await engine.classify(["room again"])


async def test_swap_never_mixes_versions_within_a_call(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = TEXTS[:4]
    expected = {v: reference(registry, v, texts) for v in ("v1", "v2")}
    async with Engine(registry, engine_config()) as engine:
        with gate_worker(monkeypatch) as gate:
            held = asyncio.create_task(engine.classify(texts[:1]))
            await asyncio.to_thread(gate.entered.wait, 5)
            queued_before = asyncio.create_task(engine.classify(texts))  # bound to v1 while still queued
            await asyncio.sleep(0.01)
            info = await engine.swap_to("v2")
            assert info.name == "v2" and engine.version == "v2"
            queued_after = asyncio.create_task(engine.classify(texts))
            await asyncio.sleep(0.01)
            gate.release()
            before, after = await queued_before, await queued_after
        assert (await held).model_version == "v1"
        assert before.model_version == "v1"
        assert after.model_version == "v2"
        _check(before, texts, expected["v1"])
        _check(after, texts, expected["v2"])


async def test_follows_the_registrys_active_pointer(registry: Registry) -> None:
    async with Engine(registry, engine_config(poll_interval_s=0.05)) as engine:
        assert engine.version == "v1"
        await asyncio.to_thread(registry.activate, "v2")  # as `triage models activate` in another process
        for _ in range(100):
            if engine.version == "v2":
                break
            await asyncio.sleep(0.05)
        assert engine.version == "v2"
        assert (await engine.classify(["hello"])).model_version == "v2"


@pytest.mark.parametrize(
    ("backend", "broken_file"), [("torch", "heads.safetensors"), ("onnx", "onnx/fp32.onnx")]
)
async def test_a_broken_version_is_refused_and_the_old_one_keeps_serving(
    registry: Registry, caplog: pytest.LogCaptureFixture, backend: Any, broken_file: str
) -> None:
    (Path(registry.get("v2").path) / broken_file).unlink()
    async with Engine(registry, engine_config(poll_interval_s=0.05, backend=backend)) as engine:
        with pytest.raises(ModelLoadError):
            await engine.swap_to("v2")
        with pytest.raises(RegistryError):
            await engine.swap_to("v9")
        assert engine.version == "v1"
        await asyncio.to_thread(registry.activate, "v2")

        async def refused() -> bool:
            return "cannot be served" in caplog.text

        assert await eventually(refused, within_s=10)
        assert engine.version == "v1"
        assert (await engine.classify(["still here"])).model_version == "v1"


async def test_a_version_that_cannot_be_exported_is_served_on_pytorch_when_onnx_was_only_the_default(
    registry: Registry, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX is chosen on the CPU for speed: a full or read-only disk must not stop a version from serving,
    while a backend asked for by name still fails loudly."""

    def disk_full(info: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("classifier.onnx_backend.ensure_onnx", disk_full)
    async with Engine(registry, engine_config(backend="auto")) as engine:
        assert engine.backend == "onnx"  # what auto chose on this CPU
        result = await engine.classify(["the app crashes"])
        assert result.model_version == "v1" and engine.current is not None
        assert engine.current.backend == "torch"
    assert "No space left on device: serving it on PyTorch instead" in caplog.text
    with pytest.raises(ModelLoadError, match="No space left"):
        async with Engine(registry, engine_config(backend="onnx")):
            pass


async def test_pinned_version_ignores_the_active_pointer(registry: Registry) -> None:
    config = engine_config(poll_interval_s=0.05)
    async with Engine(registry, config, version="v1") as pinned, Engine(registry, config) as following:
        assert pinned.version == following.version == "v1"
        await asyncio.to_thread(registry.activate, "v2")

        async def followed() -> bool:  # an engine polling as often saw the change and acted on it
            return following.version == "v2"

        assert await eventually(followed, within_s=10)
        assert pinned.version == "v1"


async def test_close_finishes_queued_calls_then_refuses(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(registry, engine_config())
    await engine.start()
    with gate_worker(monkeypatch) as gate:
        calls = [asyncio.create_task(engine.classify([t])) for t in TEXTS]
        await asyncio.to_thread(gate.entered.wait, 5)
        closing = asyncio.create_task(engine.close())
        await asyncio.sleep(0.05)
        assert not closing.done()
        with pytest.raises(EngineNotReady):
            await engine.classify(["too late"])
        gate.release()
        await closing
    assert all(c.result().model_version == "v1" for c in calls)


async def test_a_cancelled_call_does_not_disturb_the_others(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Engine(registry, engine_config()) as engine:
        with gate_worker(monkeypatch) as gate:
            held = asyncio.create_task(engine.classify(["first"]))
            await asyncio.to_thread(gate.entered.wait, 5)
            doomed = asyncio.create_task(engine.classify(["cancelled"] * 3))
            kept = asyncio.create_task(engine.classify(["kept"]))
            await asyncio.sleep(0.01)
            doomed.cancel()
            gate.release()
            assert (await held).model_version == "v1"
            assert len((await kept).results) == 1
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert engine.queue_depth == 0


async def test_a_call_that_breaks_its_batch_fails_alone(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls queued together share one tokenization; when it fails, each call is run on its own."""
    poison = "a text the tokenizer cannot take"  # as a fast tokenizer fails on a lone surrogate
    tokenized: list[list[str]] = []
    tokenize = engine_module.tokenize

    def failing_tokenize(tokenizer: Any, texts: list[str], max_length: int) -> Any:
        if threading.current_thread().name == "triage-engine":
            tokenized.append(list(texts))
        if poison in texts:
            raise TypeError(
                "TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]"
            )
        return tokenize(tokenizer, texts, max_length)

    monkeypatch.setattr(engine_module, "tokenize", failing_tokenize)
    good = TEXTS[:6]
    expected = reference(registry, "v1", good)
    async with Engine(registry, engine_config()) as engine:
        with gate_worker(monkeypatch) as gate:
            held = asyncio.create_task(engine.classify(["first"]))
            await asyncio.to_thread(gate.entered.wait, 5)  # the worker is busy: the next calls queue up
            calls = [asyncio.create_task(engine.classify([text])) for text in good]
            bad = asyncio.create_task(engine.classify(["ok", poison]))
            await asyncio.sleep(0)  # each task queues its texts in its first step
            assert engine.queue_depth == len(good) + 2
            gate.release()
            results = await asyncio.gather(*calls)
            with pytest.raises(EngineError, match="inference failed"):
                await bad
            assert (await held).model_version == "v1"
    assert sorted(tokenized[1]) == sorted([*good, "ok", poison]), "all calls shared one batch"
    for text, result, ref in zip(good, results, expected, strict=True):
        _check(result, [text], [ref])


@pytest.mark.parametrize(
    "texts",
    [
        [],
        ["x"] * (MAX_TEXTS + 1),
        ["ok", 3],
        "a bare string",
        ["x" * (MAX_CHARS + 1)],
        None,
        ["ok", "\ud800"],
    ],
    ids=["empty", "too-many", "not-a-string", "bare-string", "too-long", "none", "lone-surrogate"],
)
async def test_invalid_input_is_rejected_before_queueing(registry: Registry, texts: Any) -> None:
    async with Engine(registry, engine_config()) as engine:
        with pytest.raises(InvalidInput):
            await engine.classify(texts)
        assert engine.queue_depth == 0


async def test_start_without_an_active_model_says_so(tmp_path: Path) -> None:
    engine = Engine(Registry(tmp_path / "empty"), engine_config())
    with pytest.raises(RegistryError, match="no active model"):
        await engine.start()
    with pytest.raises(EngineNotReady):
        await engine.classify(["hello"])


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="queue_size"):
        EngineConfig(queue_size=10)
    with pytest.raises(ValueError, match="max_wait_ms"):
        EngineConfig(max_wait_ms=-1)


def test_config_defaults_are_the_gates_and_the_settings_which_load_no_torch() -> None:
    """The retraining gate judges a candidate as the engine serves it by default; the gate and the
    settings take those defaults from classifier/results.py, so importing them loads no torch."""
    from bot.settings import RetrainSettings
    from classifier.promotion import Gate

    config, gate = EngineConfig(), Gate()
    settings = RetrainSettings.model_fields
    assert config.backend == gate.backend == settings["classifier_backend"].default
    assert config.quantize == gate.quantize == settings["classifier_quantize"].default
    code = "import sys, bot.settings, classifier.promotion; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "False"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CUDA"):
        Engine(Registry(tmp_path), EngineConfig(device="cuda"))


def test_micro_batches_cut_where_lengths_jump() -> None:
    lengths = [5, 6, 5, 6, 60, 61, 62, 200]
    batches = micro_batches(lengths, max_tokens=1024, batch_cost=32)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    groups = [sorted(lengths[i] for i in b) for b in batches]
    assert groups == [[5, 5, 6, 6], [60, 61, 62], [200]]  # not one batch padded to 200
    assert micro_batches([300, 10], max_tokens=100) == [[1], [0]]  # too long for a batch: alone
    assert micro_batches([], max_tokens=100) == []

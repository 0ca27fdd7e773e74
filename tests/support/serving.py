"""Shared helpers for the engine, server, client and page tests: tiny registries, reference outputs,
a real server on an ephemeral port, and a switch that holds the engine's worker inside a forward pass.

Test modules import the fixtures ``registry_fixture``, ``registry_template_fixture`` and
``tiny_base_fixture``; pytest knows them as ``registry``, ``registry_template`` and ``tiny_base``.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from aiohttp import web

import classifier.engine as engine_module
from classifier.engine import Engine, EngineConfig
from classifier.model import MultiHeadClassifier, predict_probs, to_predictions, torch_runner
from classifier.onnx_backend import ensure_onnx
from classifier.registry import Registry
from classifier.server import LIFECYCLE, ServerSettings, create_app
from tests.support.tiny_model import make_tiny_bert, make_tiny_version

TOKEN = "test-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
PNG = bytes.fromhex(  # a valid 1x1 PNG
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6360f8cf000000030101007d6a3d8b0000000049454e44ae426082"
)

TEXTS = [
    "hi",
    "I was charged twice for my subscription this month, please refund",
    "The dashboard is down for everyone in our team since 9am!!!",
    "How do I export my data as CSV?",
    "Could you add dark mode to the mobile app? " * 3,
    "Password reset email never arrives",
    "thanks, that fixed it :)",
    "billing " * 80,  # longer than the tiny model's 64 tokens: truncated
    "🙂 ünïcödé and emoji",
    "",
]


@pytest.fixture(name="tiny_base", scope="session")
def tiny_base_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(name="registry_template", scope="session")
def registry_template_fixture(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """v1 (active) and v2 (different weights, not active), made once with their ONNX files (what the
    default backend serves on the CPU); tests get copies."""
    reg = Registry(tmp_path_factory.mktemp("registry-template") / "models")
    make_tiny_version(reg, tiny_base, seed=0)
    make_tiny_version(reg, tiny_base, seed=1, activate=False)
    for name in reg.names():
        ensure_onnx(reg.get(name))
    return reg.root


def copy_registry(template: Path, directory: Path) -> Registry:
    shutil.copytree(template, directory, ignore=shutil.ignore_patterns(".lock"))
    return Registry(directory)


@pytest.fixture(name="registry")
def registry_fixture(tmp_path: Path, registry_template: Path) -> Registry:
    """A fresh copy of the template registry: v1 (active) and v2 (not active)."""
    return copy_registry(registry_template, tmp_path / "models")


Expected = dict[str, list[dict[str, Any]]]  # version -> per text: {"heads": {head: HeadPrediction}, ...}


def reference(registry: Registry, version: str, texts: Sequence[str]) -> list[dict[str, Any]]:
    """Unbatched inference (one text per forward pass) by PyTorch in float32 on the CPU."""
    model, tokenizer, max_length = MultiHeadClassifier.load(Path(registry.get(version).path))
    cpu = torch.device("cpu")
    runner = torch_runner(model, cpu, bf16=False)
    out = []
    for text in texts:
        probs = predict_probs(runner, model.schema, tokenizer, [text], max_length, cpu)
        full = len(tokenizer(text, truncation=False, verbose=False)["input_ids"])
        out.append({"heads": to_predictions(model.schema, probs, 0), "truncated": full > max_length})
    return out


def assert_heads_match(
    actual: dict[str, dict[str, Any]], expected: dict[str, Any], atol: float = 1e-4
) -> None:
    """``actual``: JSON heads of one result; ``expected``: an entry of ``reference``."""
    assert set(actual) == set(expected["heads"])
    for head, prediction in expected["heads"].items():
        got = actual[head]
        assert got["label"] == prediction.label, head
        assert abs(got["confidence"] - prediction.confidence) < atol
        assert list(got["scores"]) == list(prediction.scores)
        np.testing.assert_allclose(list(got["scores"].values()), list(prediction.scores.values()), atol=atol)


def settings(**overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "token": TOKEN,
        "admin_token": ADMIN_TOKEN,
        "poll_interval_s": 0.05,
        "shutdown_timeout_s": 5.0,
    }
    values.update(overrides)
    return ServerSettings(**values)


def engine_config(**overrides: Any) -> EngineConfig:
    values: dict[str, Any] = {"poll_interval_s": 0.05, "max_wait_ms": 2.0}
    values.update(overrides)
    return EngineConfig(**values)


@asynccontextmanager
async def running_server(
    engine: Engine, server_settings: ServerSettings | None = None, no_auth: bool = False
) -> AsyncIterator[str]:
    """The real app on 127.0.0.1 and an ephemeral port, model loaded; yields the base URL."""
    app = create_app(engine, server_settings or settings(), no_auth=no_auth)
    runner = web.AppRunner(app, shutdown_timeout=5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        load_task = app[LIFECYCLE].load_task
        assert load_task is not None
        await load_task
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class WorkerGate:
    """Holds the engine's worker thread at the start of its next forward pass until ``release()``."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()

    def release(self) -> None:
        self.released.set()


@contextmanager
def gate_worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[WorkerGate]:
    gate = WorkerGate()
    original = engine_module._forward

    def gated(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "triage-engine":  # not the loader thread's warm-up
            gate.entered.set()
            if not gate.released.wait(timeout=20):
                raise RuntimeError("test gate never released")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_module, "_forward", gated)
    try:
        yield gate
    finally:
        gate.release()

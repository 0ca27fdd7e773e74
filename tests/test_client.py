"""The bot's classifier interface: in-process and HTTP behave the same; retries, timeouts and errors."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from classifier.client import (
    Classifier,
    ClassifierError,
    ClassifierUnavailable,
    HttpClassifier,
    InvalidInput,
    LocalClassifier,
    RetryPolicy,
    make_classifier,
)
from classifier.engine import Engine, EngineOverloaded
from classifier.registry import Registry
from tests.support.serving import (  # noqa: F401 (fixtures)
    ADMIN_TOKEN,
    TEXTS,
    TOKEN,
    assert_heads_match,
    engine_config,
    reference,
    registry_fixture,
    registry_template_fixture,
    running_server,
    tiny_base_fixture,
)
from tests.support.tiny_model import make_tiny_version

FAST = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.05)


def _heads_json(result: Any) -> list[dict[str, Any]]:
    return [{h: asdict(p) for h, p in r.heads.items()} for r in result.results]


async def test_local_and_http_give_the_same_results(registry: Registry) -> None:
    expected = reference(registry, "v1", TEXTS)
    local = make_classifier(None, None, registry=registry, engine_config=engine_config(), embedded="thread")
    assert isinstance(local, LocalClassifier) and isinstance(local, Classifier)
    engine = Engine(registry, engine_config())
    async with running_server(engine) as url:
        remote = make_classifier(url, TOKEN, admin_token=ADMIN_TOKEN, retry=FAST)
        assert isinstance(remote, HttpClassifier) and isinstance(remote, Classifier)
        assert TOKEN not in repr(remote)
        try:
            results = [await c.classify(TEXTS) for c in (local, remote)]
            for result in results:
                assert result.model_version == "v1"
                for heads, text_result, ref in zip(
                    _heads_json(result), result.results, expected, strict=True
                ):
                    assert_heads_match(heads, ref)
                    assert text_result.truncated == ref["truncated"]
            models = [await c.models() for c in (local, remote)]
            assert models[0] == models[1]
            assert [(m.name, m.serving) for m in models[0]] == [("v1", True), ("v2", False)]
            assert await remote.activate("v2") == "v2"
            assert (await remote.classify(["hi"])).model_version == "v2"
        finally:
            await local.close()
            await remote.close()


@pytest.mark.parametrize("kind", ["local", "http"])
async def test_invalid_input_is_refused_the_same_way(registry: Registry, kind: str) -> None:
    classifier = (
        LocalClassifier(registry=registry, config=engine_config())
        if kind == "local"
        else HttpClassifier("http://127.0.0.1:9", TOKEN, retry=FAST)  # never contacted
    )
    try:
        for bad in ([], ["x"] * 257, [1], ["x" * 20_001]):
            with pytest.raises(InvalidInput):
                await classifier.classify(bad)
    finally:
        await classifier.close()


async def test_local_classifier_waits_for_the_first_model(tmp_path: Path, tiny_base: Path) -> None:
    registry = Registry(tmp_path / "models")
    classifier = LocalClassifier(registry=registry, config=engine_config(), retry=FAST)
    try:
        with pytest.raises(ClassifierUnavailable, match="no model"):
            await classifier.classify(["before any training"])
        make_tiny_version(registry, tiny_base)  # the first training finishes
        assert (await classifier.classify(["after training"])).model_version == "v1"
    finally:
        await classifier.close()


async def test_local_classifier_waits_out_overload_then_gives_up(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    classifier = LocalClassifier(registry=registry, config=engine_config(), retry=FAST)
    classify = classifier.engine.classify
    overloaded = 2  # the next calls refused as overloaded

    async def full_queue(texts: list[str], neighbors: int = 0) -> Any:
        nonlocal overloaded
        if overloaded:
            overloaded -= 1
            raise EngineOverloaded("queue full", retry_after_s=0.01)
        return await classify(texts, neighbors)

    monkeypatch.setattr(classifier.engine, "classify", full_queue)
    try:
        assert (await classifier.classify(["hello"])).model_version == "v1"
        assert overloaded == 0
        overloaded = FAST.attempts or 0
        with pytest.raises(ClassifierUnavailable, match="overloaded after 3 attempts: queue full") as e:
            await classifier.classify(["hello"])
        assert e.value.retry_after_s == 0.01 and not isinstance(e.value, EngineOverloaded)
    finally:
        await classifier.close()


@asynccontextmanager
async def fake_server(handler: Callable[[web.Request], Any]) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)  # do not wait for a deliberately slow handler
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


OK_BODY = {
    "model_version": "v7",
    "results": [{"topic": {"label": "bug", "confidence": 0.9, "scores": {"bug": 0.9, "other": 0.1}}}],
    "truncated": [False],
}


async def test_http_retries_503_honouring_retry_after_then_succeeds() -> None:
    calls: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(asyncio.get_running_loop().time())
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        if len(calls) < 3:
            return web.json_response({"error": "queue full"}, status=503, headers={"Retry-After": "0.05"})
        return web.json_response(OK_BODY)

    async with fake_server(handler) as url:
        client = HttpClassifier(url, TOKEN, retry=RetryPolicy(attempts=4, backoff_s=0.001, max_backoff_s=1))
        result = await client.classify(["app crashes"])
        await client.close()
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.045  # waited as Retry-After asked (not the tiny backoff)
    assert result.model_version == "v7" and result.results[0].heads["topic"].label == "bug"


async def test_http_gives_up_with_classifier_unavailable() -> None:
    async def overloaded(request: web.Request) -> web.Response:
        return web.json_response({"error": "queue full"}, status=503, headers={"Retry-After": "1"})

    async with fake_server(overloaded) as url:
        client = HttpClassifier(url, TOKEN, retry=FAST)
        with pytest.raises(ClassifierUnavailable, match=r"after 3 attempts.*queue full") as excinfo:
            await client.classify(["hello"])
        assert excinfo.value.retry_after_s == 1
        await client.close()


async def test_http_connection_refused_is_unavailable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = HttpClassifier(f"http://127.0.0.1:{port}", TOKEN, retry=FAST)
    with pytest.raises(ClassifierUnavailable, match="unavailable after 3 attempts"):
        await client.classify(["hello"])
    await client.close()


async def test_http_timeout_is_unavailable() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response(OK_BODY)

    async with fake_server(slow) as url:
        client = HttpClassifier(url, TOKEN, timeout_s=0.1, retry=RetryPolicy(attempts=2, backoff_s=0.01))
        with pytest.raises(ClassifierUnavailable, match="Timeout"):
            await client.classify(["hello"])
        await client.close()


@pytest.mark.parametrize(
    ("status", "error"),
    [(401, ClassifierError), (403, ClassifierError), (422, InvalidInput), (500, ClassifierUnavailable)],
)
async def test_http_errors_map_to_the_interface(status: int, error: type[Exception]) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.json_response({"error": f"status {status}"}, status=status)

    async with fake_server(handler) as url:
        client = HttpClassifier(url, TOKEN, retry=FAST)
        with pytest.raises(error, match=f"status {status}") as excinfo:
            await client.classify(["hello"])
        await client.close()
    assert calls == 1  # only 502/503/504 and network errors are retried
    if status in (401, 403):
        assert not isinstance(excinfo.value, ClassifierUnavailable)


async def test_an_answer_of_another_shape_is_a_classifier_error() -> None:
    """A CLASSIFIER_URL pointing at some other service: its answer is refused, saying what is wrong."""

    async def other_service(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async with fake_server(other_service) as url:
        client = HttpClassifier(url, TOKEN, retry=FAST)
        with pytest.raises(ClassifierError, match="unexpected body: model_version: Field required") as e:
            await client.classify(["hello"])
        await client.close()
    assert not isinstance(e.value, ClassifierUnavailable)


async def test_url_credentials_are_sent_but_never_shown() -> None:
    """http://user:pass@host: the password goes out as basic auth and into no message or repr."""
    seen: list[str] = []

    async def overloaded(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"error": "queue full"}, status=503)

    async with fake_server(overloaded) as url:
        client = HttpClassifier(url.replace("://", "://triage:s3cret-pass@"), None, retry=FAST)
        with pytest.raises(ClassifierUnavailable) as excinfo:
            await client.classify(["hello"])
        await client.close()
    assert seen and set(seen) == {"Basic " + base64.b64encode(b"triage:s3cret-pass").decode()}
    assert "s3cret-pass" not in str(excinfo.value) and "s3cret-pass" not in repr(client)
    assert f"classifier at {url.replace('://', '://***@')} unavailable" in str(excinfo.value)

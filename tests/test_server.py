"""HTTP API on a real server (127.0.0.1, ephemeral port) with the tiny model."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yarl
from typer.testing import CliRunner

import classifier.engine as engine_module
from classifier.engine import Engine
from classifier.registry import Registry
from classifier.results import MAX_CHARS, MAX_TEXTS
from classifier.schema import LabelSchema
from classifier.server import ConfigError, load_settings, serve, serve_command
from tests.support.serving import (  # noqa: F401 (fixtures)
    ADMIN_TOKEN,
    PNG,
    TEXTS,
    TOKEN,
    assert_heads_match,
    copy_registry,
    engine_config,
    gate_worker,
    reference,
    registry_fixture,
    registry_template_fixture,
    running_server,
    settings,
    tiny_base_fixture,
)
from tests.support.tiny_model import make_tiny_version
from tests.support.waiting import eventually

AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# One loop per module, so that one server can serve all the read-only tests (start-up costs most).
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory, registry_template: Path) -> Any:
    """A server for tests that change nothing: (session, engine, registry)."""
    registry = copy_registry(registry_template, tmp_path_factory.mktemp("shared") / "models")
    engine = Engine(registry, engine_config())
    async with running_server(engine) as url, aiohttp.ClientSession(url) as http:
        yield http, engine, registry


@pytest_asyncio.fixture(loop_scope="module")
async def server(registry: Registry) -> Any:
    """A server of its own, for tests that activate versions or change files."""
    engine = Engine(registry, engine_config())
    async with running_server(engine) as url, aiohttp.ClientSession(url) as http:
        yield http, engine


async def _json(response: aiohttp.ClientResponse) -> Any:
    assert response.content_type == "application/json", await response.text()
    return await response.json()


# ---- probes and metrics ----------------------------------------------------------------------------
async def test_health_ready_and_metrics_are_public(shared: Any) -> None:
    http, _, _ = shared
    async with http.get("/healthz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"
    async with http.get("/readyz") as r:
        assert r.status == 200 and (await r.json()) == {"status": "ready", "model_version": "v1"}
    async with http.post("/v1/classify", json={"texts": ["hello", "world"]}, headers=AUTH) as r:
        assert r.status == 200
    async with http.get("/metrics") as r:
        assert r.status == 200
        text = await r.text()
    assert 'triage_classifier_model_info{version="v1"} 1.0' in text
    assert "triage_classifier_queue_depth 0.0" in text
    assert 'triage_classifier_http_requests_total{endpoint="/v1/classify",status="200"}' in text
    assert 'triage_classifier_http_request_seconds_bucket{endpoint="/v1/classify"' in text
    assert "triage_classifier_batch_texts_bucket" in text
    assert "triage_classifier_ready 1.0" in text


# ---- authentication --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("POST", "/v1/classify", {}, 401),
        ("POST", "/v1/classify", {"Authorization": "Bearer wrong-token-0123456789"}, 401),
        ("POST", "/v1/classify", {"Authorization": f"Basic {TOKEN}"}, 401),
        ("POST", "/v1/classify", {"Authorization": "Bearer"}, 401),
        ("POST", "/v1/classify", {"Authorization": f"Bearer {TOKEN}x"}, 401),
        ("POST", "/v1/classify", AUTH, 200),
        ("POST", "/v1/classify", {"Authorization": f"bearer  {TOKEN}"}, 200),
        ("POST", "/v1/classify", ADMIN, 200),
        ("GET", "/v1/model", {}, 401),
        ("GET", "/v1/model", AUTH, 200),
        ("GET", "/v1/models", {}, 401),
        ("GET", "/v1/models", AUTH, 403),
        ("GET", "/v1/models", ADMIN, 200),
        ("POST", "/v1/models/v2/activate", {}, 401),
        ("POST", "/v1/models/v2/activate", AUTH, 403),
        ("POST", "/v1/models/v2/activate", {"Authorization": "Bearer wrong-token-0123456789"}, 401),
        ("GET", "/", {}, 200),
        ("GET", "/static/app.js", {}, 200),
        ("GET", "/healthz", {}, 200),
    ],
)
async def test_auth(shared: Any, method: str, path: str, headers: dict[str, str], status: int) -> None:
    http, _, _ = shared
    body = {"texts": ["hello"]} if path == "/v1/classify" else None
    async with http.request(method, path, json=body, headers=headers) as r:
        assert r.status == status, await r.text()
        if status == 401:
            assert "error" in await _json(r)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")


async def test_admin_endpoints_are_off_without_an_admin_token(registry: Registry) -> None:
    engine = Engine(registry, engine_config())
    async with (
        running_server(engine, settings(admin_token=None)) as url,
        aiohttp.ClientSession(url) as http,
        http.get("/v1/models", headers=AUTH) as r,
    ):
        assert r.status == 403
        assert "CLASSIFIER_ADMIN_TOKEN" in (await _json(r))["error"]


async def test_no_auth_mode_needs_no_token(registry: Registry) -> None:
    engine = Engine(registry, engine_config())
    async with (
        running_server(engine, settings(token=None, admin_token=None), no_auth=True) as url,
        aiohttp.ClientSession(url) as http,
    ):
        async with http.post("/v1/classify", json={"texts": ["hello"]}) as r:
            assert r.status == 200
        async with http.get("/v1/models") as r:
            assert r.status == 200


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "malformed JSON"),
        (b"\xff\xfe", 400, "malformed JSON"),
        (b"", 400, "malformed JSON"),
        (b'["hello"]', 422, "JSON object"),
        (b"{}", 422, "missing 'texts'"),
        (b'{"text": ["hello"]}', 422, "unknown field"),
        (b'{"texts": ["hello"], "extra": 1}', 422, "unknown field"),
        (b'{"texts": "hello"}', 422, "list of strings"),
        (b'{"texts": null}', 422, "list of strings"),
        (b'{"texts": {"a": "b"}}', 422, "list of strings"),
        (b'{"texts": []}', 422, "empty"),
        (json.dumps({"texts": ["x"] * (MAX_TEXTS + 1)}).encode(), 422, "at most 256"),
        (b'{"texts": ["ok", 5]}', 422, "texts[1]"),
        (b'{"texts": [["nested"]]}', 422, "texts[0]"),
        (json.dumps({"texts": ["ok", "x" * (MAX_CHARS + 1)]}).encode(), 422, "texts[1] has 20001 characters"),
        (b'{"texts": ["ok", "\\ud800"]}', 422, "texts[1] cannot be encoded as UTF-8"),
        (b'{"texts": [' + b"[" * 200_000 + b"]" * 200_000 + b"]}", 400, "nested too deeply"),
        (b'{"texts": ' * 200_000, 400, "nested too deeply"),
    ],
)
async def test_bad_input(shared: Any, body: bytes, status: int, message: str) -> None:
    http, engine, _ = shared
    async with http.post(
        "/v1/classify", data=body, headers={**AUTH, "Content-Type": "application/json"}
    ) as r:
        assert r.status == status
        assert message in (await _json(r))["error"]
    assert engine.queue_depth == 0


async def test_limits_are_inclusive(shared: Any) -> None:
    http, _, _ = shared
    async with http.post(
        "/v1/classify", json={"texts": ["x " * (MAX_CHARS // 2)] + ["y"] * (MAX_TEXTS - 1)}, headers=AUTH
    ) as r:
        assert r.status == 200
        body = await r.json()
    assert len(body["results"]) == MAX_TEXTS and body["truncated"][0] is True


async def test_oversized_body_is_413(registry: Registry) -> None:
    engine = Engine(registry, engine_config())
    async with (
        running_server(engine, settings(max_body_bytes=4096)) as url,
        aiohttp.ClientSession(url) as http,
        http.post("/v1/classify", json={"texts": ["x" * 5000]}, headers=AUTH) as r,
    ):
        assert r.status == 413
        assert "error" in await _json(r)


async def test_unknown_route_and_method_are_json_errors(shared: Any) -> None:
    http, _, _ = shared
    async with http.get("/v1/nothing", headers=AUTH) as r:
        assert r.status == 404 and "error" in await _json(r)
    async with http.get("/v1/classify", headers=AUTH) as r:
        assert r.status == 405 and "error" in await _json(r)


# ---- results ---------------------------------------------------------------------------------------
async def test_results_equal_unbatched_inference_under_concurrency(shared: Any) -> None:
    http, engine, registry = shared
    expected = reference(registry, "v1", TEXTS)
    rng = random.Random(1)
    calls = [rng.sample(range(len(TEXTS)), rng.randint(1, len(TEXTS))) for _ in range(40)]

    async def post(idx: list[int]) -> dict[str, Any]:
        async with http.post("/v1/classify", json={"texts": [TEXTS[i] for i in idx]}, headers=AUTH) as r:
            assert r.status == 200
            return await r.json()

    bodies = await asyncio.gather(*(post(idx) for idx in calls))
    for idx, body in zip(calls, bodies, strict=True):
        assert body["model_version"] == "v1"
        assert len(body["results"]) == len(idx) == len(body["truncated"])
        for i, result, truncated in zip(idx, body["results"], body["truncated"], strict=True):  # input order
            assert_heads_match(result, expected[i])
            assert truncated == expected[i]["truncated"]
    assert engine.stats.max_batch_texts > len(TEXTS), "requests should have been batched together"


async def test_requests_batched_with_one_that_breaks_inference_succeed(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    http, engine = server
    poison = "a text the tokenizer cannot take"
    tokenize = engine_module.tokenize

    def failing_tokenize(tokenizer: Any, texts: list[str], max_length: int) -> Any:
        if poison in texts:  # as a fast tokenizer fails on input it cannot encode
            raise TypeError(
                "TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]"
            )
        return tokenize(tokenizer, texts, max_length)

    monkeypatch.setattr(engine_module, "tokenize", failing_tokenize)

    async def post(texts: list[str]) -> tuple[int, Any]:
        async with http.post("/v1/classify", json={"texts": texts}, headers=AUTH) as r:
            return r.status, await r.json()

    with gate_worker(monkeypatch) as gate:
        held = asyncio.create_task(post(["first"]))
        await asyncio.to_thread(gate.entered.wait, 5)  # the worker is busy: what follows queues up
        good = [asyncio.create_task(post([text])) for text in TEXTS[:6]]
        bad = asyncio.create_task(post(["ok", poison]))
        for _ in range(500):  # until all seven requests wait for the same pool
            if engine.queue_depth == 8:
                break
            await asyncio.sleep(0.01)
        assert engine.queue_depth == 8
        gate.release()
        statuses = [status for status, _ in await asyncio.gather(held, *good)]
        bad_status, bad_body = await bad
    assert statuses == [200] * 7
    assert bad_status == 500 and "inference failed" in bad_body["error"]


async def test_overload_is_503_with_retry_after(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(registry, engine_config(queue_size=MAX_TEXTS))
    async with running_server(engine) as url, aiohttp.ClientSession(url) as http:
        with gate_worker(monkeypatch) as gate:
            held = asyncio.create_task(http.post("/v1/classify", json={"texts": ["held"]}, headers=AUTH))
            await asyncio.to_thread(gate.entered.wait, 5)
            full = asyncio.create_task(
                http.post("/v1/classify", json={"texts": ["q"] * MAX_TEXTS}, headers=AUTH)
            )
            for _ in range(200):
                if engine.queue_depth == MAX_TEXTS:
                    break
                await asyncio.sleep(0.01)
            async with http.post("/v1/classify", json={"texts": ["one more"]}, headers=AUTH) as r:
                assert r.status == 503
                assert int(r.headers["Retry-After"]) >= 1
                assert "queue full" in (await _json(r))["error"]
            gate.release()
            for task in (held, full):
                response = await task
                assert response.status == 200
                response.release()
        async with http.get("/metrics") as r:
            assert 'endpoint="/v1/classify",status="503"' in await r.text()


async def test_hot_swap_under_load_fails_nothing_and_never_mixes_versions(registry: Registry) -> None:
    expected = {v: reference(registry, v, TEXTS) for v in ("v1", "v2")}
    engine = Engine(registry, engine_config(poll_interval_s=0.05))
    stop = asyncio.Event()
    seen: list[str] = []
    failures: list[str] = []

    async def client(http: aiohttp.ClientSession, seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            idx = rng.sample(range(len(TEXTS)), rng.randint(1, 4))
            async with http.post("/v1/classify", json={"texts": [TEXTS[i] for i in idx]}, headers=AUTH) as r:
                if r.status != 200:
                    failures.append(f"{r.status}: {await r.text()}")
                    continue
                body = await r.json()
            version = body["model_version"]
            seen.append(version)
            for i, result in zip(idx, body["results"], strict=True):
                assert_heads_match(result, expected[version][i])  # every text from the version named

    def answered_by(version: str, answers: int = 20) -> Callable[[], Awaitable[bool]]:
        """From now on, ``answers`` answers came from ``version``."""
        start = len(seen)

        async def check() -> bool:
            return seen[start:].count(version) >= answers

        return check

    async with running_server(engine) as url, aiohttp.ClientSession(url) as http:
        clients = [asyncio.create_task(client(http, seed)) for seed in range(12)]
        assert await eventually(answered_by("v1"))
        async with http.post("/v1/models/v2/activate", headers=ADMIN) as r:  # the admin endpoint
            assert r.status == 200
            assert (await r.json()) == {"active": "v2", "serving": "v2", "lost_heads": []}
        assert registry.active_name() == "v2"
        assert await eventually(answered_by("v2"))
        await asyncio.to_thread(registry.activate, "v1")  # another process flips ACTIVE: the poller follows
        assert await eventually(answered_by("v1"))
        stop.set()
        await asyncio.gather(*clients)
    assert failures == []
    assert {"v1", "v2"} <= set(seen)
    assert seen[-1] == "v1"
    assert len(seen) > 50


# ---- models and evaluation images ------------------------------------------------------------------
async def test_models_list_and_activate(server: Any, registry: Registry) -> None:
    http, engine = server
    async with http.get("/v1/models", headers=ADMIN) as r:
        body = await r.json()
    assert body["active"] == "v1" and body["serving"] == "v1"
    assert [(v["name"], v["status"], v["serving"]) for v in body["versions"]] == [
        ("v1", "active", True),
        ("v2", "candidate", False),
    ]
    async with http.post("/v1/models/v9/activate", headers=ADMIN) as r:
        assert r.status == 404 and "no model version" in (await _json(r))["error"]
    async with http.post("/v1/models/..%2Fetc/activate", headers=ADMIN) as r:
        assert r.status == 404
    (Path(registry.get("v2").path) / "model.json").unlink()  # what every backend reads
    async with http.post("/v1/models/v2/activate", headers=ADMIN) as r:
        assert r.status == 409 and "cannot be served" in (await _json(r))["error"]
    assert engine.version == "v1" and registry.active_name() == "v1"  # a broken version is never recorded


async def test_activating_a_version_with_fewer_heads_reports_what_is_lost(
    server: Any, registry: Registry, tiny_base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    http, engine = server
    topic_only = make_tiny_version(
        registry, tiny_base, LabelSchema(heads={"topic": ["billing", "bug"]}), activate=False
    )
    with caplog.at_level(logging.WARNING, logger="classifier.server"):
        async with http.post(f"/v1/models/{topic_only.name}/activate", headers=ADMIN) as r:
            assert r.status == 200
            body = await r.json()
    assert body["lost_heads"] == ["urgency", "sentiment"]
    assert engine.version == topic_only.name
    assert "without urgency: escalation" in caplog.text
    async with http.post("/v1/models/v1/activate", headers=ADMIN) as r:
        assert (await r.json())["lost_heads"] == []


async def test_serving_model_and_eval_images(server: Any, registry: Registry, tmp_path: Path) -> None:
    http, _ = server
    v1 = Path(registry.get("v1").path)
    (v1 / "eval").mkdir()
    (v1 / "eval" / "confusion_topic.png").write_bytes(PNG)
    (v1 / "eval" / "metrics.json").write_text("{}")
    (v1 / "eval" / ".hidden.png").write_bytes(PNG)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"secret")
    (v1 / "eval" / "escape.png").symlink_to(secret)
    registry.update_metrics("v1", {"topic": {"accuracy": 0.9, "macro_f1": 0.8}})  # per head, as trained

    async with http.get("/v1/model", headers=AUTH) as r:
        info = await r.json()
    assert info["version"] == "v1" and info["max_length"] == 64
    assert info["metrics"]["topic"]["accuracy"] == 0.9
    assert info["base_model_name"] == Path(registry.get("v1").base_model).name
    assert "topic" in info["schema"]["heads"]
    assert [i["name"] for i in info["eval_images"]] == ["confusion_topic.png"]

    async with http.get(info["eval_images"][0]["url"], headers=AUTH) as r:
        assert r.status == 200 and r.content_type == "image/png" and await r.read() == PNG
    async with http.get(info["eval_images"][0]["url"]) as r:
        assert r.status == 401
    for path in [
        "/v1/models/v1/eval/metrics.json",
        "/v1/models/v1/eval/escape.png",
        "/v1/models/v1/eval/.hidden.png",
        "/v1/models/v1/eval/..%2F..%2Fversion.json",
        "/v1/models/v1/eval/%2E%2E%2Fsecret.png",
        "/v1/models/v1/eval/missing.png",
        "/v1/models/v2/eval/confusion_topic.png",
        "/v1/models/..%2Fv1/eval/confusion_topic.png",
        "/v1/models/v1/eval/../../version.json",
    ]:
        async with http.get(path, headers=AUTH) as r:
            assert r.status == 404, path
            assert await r.read() != b"secret"


async def test_page_is_served_with_a_strict_policy(shared: Any) -> None:
    http, _, _ = shared
    async with http.get("/") as r:
        assert r.status == 200 and r.content_type == "text/html"
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert 'id="classify"' in await r.text()
    for name in ("app.js", "style.css"):
        async with http.get(f"/static/{name}") as r:
            assert r.status == 200
    async with http.get("/static/..%2Fserver.py") as r:
        assert r.status == 404


# ---- settings, start-up and shutdown ---------------------------------------------------------------
async def test_settings_refuse_to_start_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLASSIFIER_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="CLASSIFIER_TOKEN is not set"):
        load_settings()
    assert load_settings(no_auth=True).token is None


async def test_settings_errors_name_the_variable_not_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLASSIFIER_TOKEN", "short-secret")
    with pytest.raises(ConfigError, match=r"CLASSIFIER_TOKEN: .*at least 16") as excinfo:
        load_settings()
    assert "short-secret" not in str(excinfo.value)
    monkeypatch.setenv("CLASSIFIER_TOKEN", TOKEN + "\n")
    monkeypatch.setenv("CLASSIFIER_PORT", "eighty")
    with pytest.raises(ConfigError, match="CLASSIFIER_PORT"):
        load_settings()
    monkeypatch.setenv("CLASSIFIER_PORT", "9000")
    loaded = load_settings()
    assert loaded.port == 9000 and loaded.token is not None and loaded.token.get_secret_value() == TOKEN
    assert TOKEN not in repr(loaded)
    assert load_settings(port=9100).port == 9100  # a command option beats the environment


async def test_serve_command_refuses_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    monkeypatch.delenv("CLASSIFIER_TOKEN", raising=False)
    app = typer.Typer()
    app.command()(serve_command)
    # In a thread: the command runs its own event loop (asyncio.run) once its settings are valid.
    result = await asyncio.to_thread(CliRunner().invoke, app, ["--port", "0"])
    assert result.exit_code == 2
    assert "CLASSIFIER_TOKEN is not set" in result.output


async def test_serve_drains_in_flight_requests_on_shutdown(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stop = asyncio.Event()
    ports: list[int] = []
    server = asyncio.create_task(
        serve(settings(host="127.0.0.1", port=0), registry=registry, stop=stop, on_listening=ports.append)
    )
    for _ in range(200):
        if ports:
            break
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{ports[0]}"
    async with aiohttp.ClientSession(url) as http:
        for _ in range(200):
            async with http.get("/readyz") as r:
                if r.status == 200:
                    break
            await asyncio.sleep(0.02)
        async with http.get("/?token=secret-in-query-string") as r:
            assert r.status == 200
        with gate_worker(monkeypatch) as gate:
            in_flight = [
                asyncio.create_task(http.post("/v1/classify", json={"texts": [t]}, headers=AUTH))
                for t in TEXTS
            ]
            await asyncio.to_thread(gate.entered.wait, 5)
            stop.set()  # as SIGTERM would

            async def draining() -> bool:
                return "shutting down: draining in-flight requests" in caplog.text

            assert await eventually(draining)
            assert not server.done()  # waiting for the in-flight requests
            gate.release()
            responses = await asyncio.gather(*in_flight)
        assert [r.status for r in responses] == [200] * len(TEXTS)
        for r in responses:
            assert (await r.json())["model_version"] == "v1"
    await asyncio.wait_for(server, 10)
    assert "secret-in-query-string" not in caplog.text  # the access log has no query strings
    assert TOKEN not in caplog.text and ADMIN_TOKEN not in caplog.text
    assert "GET / 200" in caplog.text


async def test_access_log_escapes_control_characters(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """A decoded %0A in the path must not start a log line of its own (log forging)."""
    caplog.set_level(logging.INFO)
    stop = asyncio.Event()
    listening: asyncio.Queue[int] = asyncio.Queue()
    server = asyncio.create_task(
        serve(settings(host="127.0.0.1", port=0), registry=registry, stop=stop, on_listening=listening.put)
    )
    port = await asyncio.wait_for(listening.get(), 10)
    forged = "/x%0A2026-12-01 18:00:00,000 INFO classifier.server: activated v9 via the HTTP API%1B[2J"
    forged = forged.replace(" ", "%20")
    async with (
        aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http,
        http.get(yarl.URL(forged, encoded=True)) as r,
    ):
        assert r.status == 404
    stop.set()
    await asyncio.wait_for(server, 10)
    [line] = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access" and "/x" in r.getMessage()]
    assert "\n" not in line and "\x1b" not in line
    assert "/x\\n2026-12-01 18:00:00,000 INFO" in line and "\\x1b[2J 404" in line


async def test_serve_fails_fast_when_no_model_can_be_loaded(tmp_path: Path) -> None:
    from classifier.registry import RegistryError

    with pytest.raises(RegistryError, match="no active model"):
        await asyncio.wait_for(serve(settings(port=0), registry=Registry(tmp_path / "empty")), 10)

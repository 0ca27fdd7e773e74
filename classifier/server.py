"""HTTP API for the classifier (aiohttp): ``triage serve``.

Endpoints; auth ``token`` is CLASSIFIER_TOKEN (or the admin token), ``admin`` is CLASSIFIER_ADMIN_TOKEN::

    GET  /                                   public  try-it page (static/index.html)
    GET  /static/{file}                      public  the page's script and style
    GET  /healthz                            public  the process is alive
    GET  /readyz                             public  a model is loaded and the server is not draining
    GET  /metrics                            public  Prometheus metrics
    POST /v1/classify                        token   {"texts": [...], "neighbors": 0..10} -> results (below)
    GET  /v1/model                           token   the serving version: schema, metrics, eval images
    GET  /v1/models/{version}/eval/{file}    token   an evaluation plot (<version>/eval/*.png)
    GET  /v1/models                          admin   all versions
    POST /v1/models/{version}/activate       admin   load, switch, and make it the registry's active version;
                                                     answers {"active", "serving", "lost_heads"}: heads the
                                                     previous version had and this one lacks (logged as a
                                                     warning; the caller reports them)

``POST /v1/classify`` answers, in input order and all from one model version::

    {"model_version": "v3",
     "results": [{"topic": {"label": "billing", "confidence": 0.91, "scores": {"billing": 0.91, ...}},
                  "urgency": {...}, ...}, ...],
     "truncated": [false, ...]}          # per text: it was cut at the model's max length

With ``"neighbors": k`` (optional, default 0) it also answers ``"neighbors": [[{"text", "label",
"similarity", "source"}, ...], ...]``: per text, the k training messages of its predicted topic most
similar to it (why this label; an empty list when the version saved no training embeddings; ``source``:
the training row's, ``slack:<message id>`` for a Slack message).

``GET /v1/model`` answers ``{"version", "status", "created", "base_model"`` (as recorded: a folder path),
``"base_model_name"`` (readable, e.g. all-MiniLM-L6-v2), ``"metrics": {head: {"n", "accuracy", "macro_f1",
...}}``, ``"schema", "max_length", "eval_images": [{"name", "url"}]}``.

Errors are JSON ``{"error": "..."}``: 400 malformed JSON (or nested too deeply), 401/403 auth, 413 body
too large, 422 wrong shape or limits (1..256 texts, each up to 20,000 characters and encodable as UTF-8:
no lone surrogates), 500 inference failed for this request, 503 overloaded or not ready (with
Retry-After).

Running: ``CLASSIFIER_TOKEN=... CLASSIFIER_ADMIN_TOKEN=... triage serve --host 0.0.0.0 --port 8080``
serves the active version of ``$TRIAGE_DATA_DIR/models`` and follows its ACTIVE pointer. Share the page
as ``http://host:8080/#token=<CLASSIFIER_TOKEN>``: browsers never send the fragment, so the token reaches
no proxy or access log; the page moves it into the tab's session storage and drops it from the address
bar. The access log records paths without query strings all the same, with control characters escaped.
SIGTERM stops listening, lets in-flight requests finish (``--shutdown-timeout``), then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from classifier.engine import ENGINE_METRICS, Engine, EngineConfig, EngineError, EngineNotReady
from classifier.logsafe import AccessLogger, escape_controls
from classifier.model import ModelLoadError
from classifier.paths import base_model_name, registry_dir
from classifier.registry import Registry, RegistryError, VersionFiles
from classifier.results import (
    MAX_TEXTS,
    Activation,
    Backend,
    ClassifierUnavailable,
    ClassifyRequest,
    ClassifyResponse,
    InvalidInput,
    ModelList,
    Quantize,
    model_summary,
)
from classifier.schema import describe_lost_heads, lost_heads

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
MIN_TOKEN_CHARS = 16

# ---- metrics (module level; each app registers them in its own CollectorRegistry) ---------------------
REQUESTS = Counter(
    "triage_classifier_http_requests_total", "HTTP requests", ["endpoint", "status"], registry=None
)
LATENCY = Histogram(
    "triage_classifier_http_request_seconds",
    "HTTP request latency",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=None,
)
TEXTS = Counter("triage_classifier_texts_total", "Texts classified over HTTP", registry=None)
HTTP_METRICS = (REQUESTS, LATENCY, TEXTS)


# ---- settings ------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """Invalid server configuration; the message names the variable (never its value)."""


class ServerSettings(BaseSettings):
    """The server's configuration: environment variables ``CLASSIFIER_*``, overridden by command options.

    Read once at start-up (``load_settings``). The registry is ``$TRIAGE_DATA_DIR/models``.
    """

    model_config = SettingsConfigDict(
        env_prefix="CLASSIFIER_", extra="ignore", env_file=None, env_ignore_empty=True
    )

    token: SecretStr | None = None
    admin_token: SecretStr | None = None
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    version: str | None = None  # serve this version (pinned) instead of following ACTIVE
    # how the engine runs: EngineConfig's fields and defaults (their meaning is documented there)
    device: str = EngineConfig.device
    cpu_threads: int | None = Field(EngineConfig.cpu_threads, ge=1)
    compile: bool = EngineConfig.compile
    bf16: bool | None = EngineConfig.bf16
    backend: Backend = EngineConfig.backend
    quantize: Quantize = EngineConfig.quantize
    max_batch_tokens: int | None = Field(EngineConfig.max_batch_tokens, ge=16)
    max_wait_ms: float = Field(EngineConfig.max_wait_ms, ge=0, le=1000)
    queue_size: int = Field(EngineConfig.queue_size, ge=MAX_TEXTS)
    poll_interval_s: float = Field(EngineConfig.poll_interval_s or 0.0, ge=0)  # 0: do not follow ACTIVE
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)  # 256 texts x 20,000 chars, with JSON escapes
    request_timeout_s: float = Field(30.0, gt=0)
    shutdown_timeout_s: float = Field(30.0, ge=0)  # how long in-flight requests may finish on SIGTERM

    @field_validator("token", "admin_token", mode="before")
    @classmethod
    def _clean_token(cls, value: Any) -> Any:
        # Secrets mounted from files often end with a newline; an empty variable means "not set".
        if isinstance(value, str):
            value = value.strip() or None
        if value is not None and len(str(value)) < MIN_TOKEN_CHARS:
            raise ValueError(f"must be at least {MIN_TOKEN_CHARS} characters (try `openssl rand -hex 32`)")
        return value

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            device=self.device,
            cpu_threads=self.cpu_threads,
            compile=self.compile,
            bf16=self.bf16,
            backend=self.backend,
            quantize=self.quantize,
            max_batch_tokens=self.max_batch_tokens,
            max_wait_ms=self.max_wait_ms,
            queue_size=self.queue_size,
            poll_interval_s=self.poll_interval_s or None,
        )


def load_settings(no_auth: bool = False, **overrides: Any) -> ServerSettings:
    """Settings from the environment plus the non-None ``overrides``; raises ConfigError naming the variable.

    Without a token the server refuses to start unless ``no_auth`` (the explicit ``--no-auth`` flag).
    """
    try:
        settings = ServerSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        # Only the location and message: the input value may be a token.
        problems = [
            f"CLASSIFIER_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        ]
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    if settings.token is None and not no_auth:
        raise ConfigError(
            "CLASSIFIER_TOKEN is not set: set it (and CLASSIFIER_ADMIN_TOKEN for the admin "
            "endpoints), or pass --no-auth to serve without authentication"
        )
    if (
        settings.token
        and settings.admin_token
        and hmac.compare_digest(settings.token.get_secret_value(), settings.admin_token.get_secret_value())
    ):
        log.warning("CLASSIFIER_ADMIN_TOKEN equals CLASSIFIER_TOKEN: every client can activate models")
    return settings


# ---- app -----------------------------------------------------------------------------------------
ENGINE = web.AppKey("engine", Engine)
REGISTRY = web.AppKey("registry", Registry)
SETTINGS = web.AppKey("settings", ServerSettings)
NO_AUTH = web.AppKey("no_auth", bool)
METRICS_REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


@dataclass
class Lifecycle:
    """Where the server is in its life: loading the model (in the background), serving, or draining."""

    load_task: asyncio.Task[None] | None = None
    load_error: str | None = None  # the model could not be loaded: /readyz says why
    draining: bool = False  # shutting down: /readyz turns 503 so balancers stop sending


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)

AuthLevel = Literal["public", "token", "admin"]
_PNG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.png$")
_STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\.(js|css|svg|png|ico)$")
_CONTENT_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # nothing about the page's address leaves it
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}


def _auth(level: AuthLevel) -> Callable[[Handler], Handler]:
    """Mark a handler's auth level; unmarked handlers need the token (deny by default)."""

    def mark(handler: Handler) -> Handler:
        handler.auth_level = level  # type: ignore[attr-defined]
        return handler

    return mark


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _json(body: BaseModel) -> web.Response:
    return web.json_response(body.model_dump(mode="json"))


class _EngineCollector(Collector):
    """Per-app gauges read from the engine at scrape time."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "triage_classifier_queue_depth", "Texts waiting for a forward pass", value=self.engine.queue_depth
        )
        info = GaugeMetricFamily(
            "triage_classifier_model_info", "The model version being served (value 1)", labels=["version"]
        )
        if self.engine.version:
            info.add_metric([self.engine.version], 1)
        yield info
        yield GaugeMetricFamily(
            "triage_classifier_ready", "1 when a model is loaded", value=int(self.engine.ready)
        )


def create_app(engine: Engine, settings: ServerSettings, *, no_auth: bool = False) -> web.Application:
    """The aiohttp app around ``engine`` (which it starts if needed, and closes — draining — on cleanup)."""
    if settings.token is None and not no_auth:
        raise ConfigError("CLASSIFIER_TOKEN is not set (pass no_auth=True to serve without authentication)")
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[_metrics_middleware, _errors_middleware, _auth_middleware],
    )
    app[ENGINE] = engine
    app[REGISTRY] = engine.registry
    app[SETTINGS] = settings
    app[NO_AUTH] = no_auth
    app[LIFECYCLE] = Lifecycle()
    metrics = CollectorRegistry(auto_describe=True)
    for collector in (*HTTP_METRICS, *ENGINE_METRICS, _EngineCollector(engine)):
        metrics.register(collector)
    app[METRICS_REGISTRY] = metrics

    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_post("/v1/classify", classify)
    app.router.add_get("/v1/model", serving_model)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/models/{version}/activate", activate_model)
    app.router.add_get("/v1/models/{version}/eval/{file}", eval_image)
    app.cleanup_ctx.append(_engine_lifespan)
    app.on_shutdown.append(_mark_draining)
    return app


async def _engine_lifespan(app: web.Application) -> AsyncIterator[None]:
    """Load the model in the background (/healthz answers at once, /readyz turns 200 when it is loaded);
    on cleanup, after aiohttp waited for in-flight handlers, close the engine, draining its queue."""
    lifecycle, engine = app[LIFECYCLE], app[ENGINE]

    async def load() -> None:
        try:
            await engine.start()
        except Exception as exc:
            lifecycle.load_error = str(exc)
            log.error("cannot load the model: %s", exc)
            raise

    lifecycle.load_task = task = asyncio.create_task(load())
    yield
    task.cancel()  # still loading: no use finishing
    with contextlib.suppress(BaseException):  # a load error was reported when it happened
        await task
    await engine.close()


async def _mark_draining(app: web.Application) -> None:
    app[LIFECYCLE].draining = True


# ---- middlewares -----------------------------------------------------------------------------------
@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as JSON ``{"error": ...}``, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        headers = {
            k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate", "retry-after")
        }
        return _error(exc.status, message, headers)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, escape_controls(request.path))
        return _error(500, "internal server error")


@web.middleware
async def _metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.resource
    # The route pattern (not the path) keeps label cardinality bounded.
    endpoint = route.canonical if route is not None else "other"
    started = time.perf_counter()
    response = await handler(request)
    LATENCY.labels(endpoint=endpoint).observe(time.perf_counter() - started)
    REQUESTS.labels(endpoint=endpoint, status=str(response.status)).inc()
    return response


@web.middleware
async def _auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.match_info.http_exception is not None:  # unknown route or method: 404/405 as is
        raise request.match_info.http_exception
    level: AuthLevel = getattr(request.match_info.handler, "auth_level", "token")
    if level == "public" or request.app[NO_AUTH]:
        return await handler(request)
    settings = request.app[SETTINGS]
    given = _bearer_token(request)
    if given is None:
        return _error(
            401,
            "missing bearer token: send 'Authorization: Bearer <token>'",
            {"WWW-Authenticate": 'Bearer realm="triage"'},
        )
    is_admin = _same(given, settings.admin_token)
    if level == "admin":
        if settings.admin_token is None:
            return _error(403, "admin endpoints are disabled: set CLASSIFIER_ADMIN_TOKEN")
        if not is_admin:
            if _same(given, settings.token):
                return _error(403, "this endpoint needs the admin token")
            return _error(401, "invalid token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    elif not (is_admin or _same(given, settings.token)):
        return _error(401, "invalid token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return await handler(request)


def _bearer_token(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def _same(given: str, expected: SecretStr | None) -> bool:
    """Constant-time comparison, so response timing does not reveal how much of a guess was right."""
    if expected is None:
        return False
    return hmac.compare_digest(given.encode(), expected.get_secret_value().encode())


# ---- public endpoints ------------------------------------------------------------------------------
@_auth("public")
async def page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={**_PAGE_HEADERS, "Content-Type": "text/html"})


@_auth("public")
async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = STATIC_DIR / name
    if not _STATIC_NAME.match(name) or not path.is_file():
        raise web.HTTPNotFound(text="no such file")
    return web.FileResponse(path, headers={**_PAGE_HEADERS, "Content-Type": _CONTENT_TYPES[path.suffix]})


@_auth("public")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@_auth("public")
async def readyz(request: web.Request) -> web.Response:
    lifecycle = request.app[LIFECYCLE]
    engine = request.app[ENGINE]
    if lifecycle.draining:
        return web.json_response({"status": "draining"}, status=503)
    if lifecycle.load_error:
        return web.json_response({"status": "error", "error": lifecycle.load_error}, status=503)
    if not engine.ready:
        return web.json_response({"status": "loading"}, status=503)
    return web.json_response({"status": "ready", "model_version": engine.version})


@_auth("public")
async def metrics_endpoint(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# ---- classify --------------------------------------------------------------------------------------
async def classify(request: web.Request) -> web.Response:
    raw = await request.read()  # client_max_size makes this raise 413 for an oversized body
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _error(400, f"malformed JSON: {exc}")
    except RecursionError:  # the parser recurses once per level: a deeply nested body exhausts the stack
        return _error(400, "malformed JSON: nested too deeply")
    try:
        parsed = ClassifyRequest.parse(body)
        texts, neighbors = parsed.texts, parsed.neighbors
    except InvalidInput as exc:
        return _error(422, str(exc))
    settings = request.app[SETTINGS]
    try:
        async with asyncio.timeout(settings.request_timeout_s):
            result = await request.app[ENGINE].classify(texts, neighbors)
    except ClassifierUnavailable as exc:  # overloaded, loading or shutting down
        retry = max(1, math.ceil(exc.retry_after_s or 1))
        return _error(503, str(exc), {"Retry-After": str(retry)})
    except TimeoutError:
        return _error(
            503, f"classification took longer than {settings.request_timeout_s:g}s", {"Retry-After": "1"}
        )
    except EngineError as exc:
        return _error(500, str(exc))
    TEXTS.inc(len(texts))
    return web.json_response(ClassifyResponse.of(result).body())  # neighbors only when asked for


# ---- models ----------------------------------------------------------------------------------------
async def serving_model(request: web.Request) -> web.Response:
    """The version answering now, with its evaluation metrics and plots (for the page)."""
    engine = request.app[ENGINE]
    loaded = engine.current
    if loaded is None:
        return _error(503, "no model loaded yet", {"Retry-After": "1"})
    registry = request.app[REGISTRY]
    try:
        info = await asyncio.to_thread(registry.get, loaded.name)  # fresh: evaluation may have run since
        images = await asyncio.to_thread(_eval_images, Path(info.path))
    except RegistryError:
        info, images = loaded.info, []  # the folder was pruned while serving: show what we loaded
    return web.json_response(
        {
            "version": loaded.name,
            "status": info.status,
            "created": info.created,
            "base_model": info.base_model,
            "base_model_name": base_model_name(info.base_model),
            "metrics": info.metrics,
            "schema": loaded.schema.to_dict(),
            "max_length": loaded.max_length,
            "eval_images": [{"name": n, "url": f"/v1/models/{loaded.name}/eval/{n}"} for n in images],
        }
    )


def _eval_images(version_dir: Path) -> list[str]:
    folder = VersionFiles(version_dir).eval.folder
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if _eval_image_path(folder, p.name) is not None)


def _eval_image_path(folder: Path, name: str) -> Path | None:
    """``folder/name`` if it is a ``*.png`` file really inside ``folder`` (symlinks resolved), else None."""
    if not _PNG_NAME.match(name):
        return None
    folder = folder.resolve()
    path = (folder / name).resolve()
    return path if path.parent == folder and path.is_file() else None


@_auth("admin")
async def list_models(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    serving = request.app[ENGINE].version
    versions, active = await asyncio.to_thread(lambda: (registry.list(), registry.active_name()))
    return _json(
        ModelList(active=active, serving=serving, versions=[model_summary(v, serving) for v in versions])
    )


@_auth("admin")
async def activate_model(request: web.Request) -> web.Response:
    """Load the version beside the current one, switch, then record it as the registry's active version.

    Loading first means a broken version is refused before any other server follows the ACTIVE pointer.
    """
    name = request.match_info["version"]
    engine = request.app[ENGINE]
    registry = request.app[REGISTRY]
    previous = engine.current
    try:
        await engine.swap_to(name)
        info = await asyncio.to_thread(registry.activate, name, "activated via the HTTP API")
    except RegistryError as exc:
        return _error(404, str(exc))
    except ModelLoadError as exc:
        return _error(409, f"version {name} cannot be served: {exc}")
    except EngineNotReady as exc:
        return _error(503, str(exc), {"Retry-After": "1"})
    log.info("activated %s via the HTTP API", escape_controls(name))
    lost = lost_heads(previous.schema.to_dict(), info.schema) if previous is not None else []
    if lost:
        log.warning("%s has no %s head: %s", name, ", ".join(lost), "; ".join(describe_lost_heads(lost)))
    return _json(Activation(active=info.name, serving=engine.version, lost_heads=lost))


async def eval_image(request: web.Request) -> web.StreamResponse:
    """Only existing ``*.png`` files directly inside ``<version>/eval``: no other file, no traversal."""
    try:
        files = await asyncio.to_thread(request.app[REGISTRY].files, request.match_info["version"])
    except RegistryError as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    path = await asyncio.to_thread(_eval_image_path, files.eval.folder, request.match_info["file"])
    if path is None:
        raise web.HTTPNotFound(text="no such evaluation image")
    return web.FileResponse(
        path,
        headers={
            "Content-Type": "image/png",
            "Cache-Control": "private, max-age=60",
            "X-Content-Type-Options": "nosniff",
        },
    )


# ---- running ---------------------------------------------------------------------------------------
async def serve(
    settings: ServerSettings,
    *,
    no_auth: bool = False,
    registry: Registry | None = None,
    stop: asyncio.Event | None = None,
    on_listening: Callable[[int], Awaitable[None] | None] | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT), then drain: stop listening, let in-flight requests
    finish (up to ``shutdown_timeout_s``), finish the engine's queue, exit. ``on_listening(port)`` is called
    once the port is open, ``on_ready(version)`` once the model is loaded.

    Raises ConfigError/RegistryError/ModelLoadError when the model cannot be loaded at start-up.
    """
    registry = registry or Registry(registry_dir())
    engine = Engine(registry, settings.engine_config(), version=settings.version)
    app = create_app(engine, settings, no_auth=no_auth)
    runner = web.AppRunner(
        app,
        shutdown_timeout=settings.shutdown_timeout_s,
        access_log_class=AccessLogger,
        handle_signals=False,
    )
    await runner.setup()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        port = _bound_port(runner)
        log.info(
            "listening on http://%s:%d (registry %s, auth %s)",
            settings.host,
            port,
            registry.root,
            "off (--no-auth)" if no_auth else "on",
        )
        if no_auth:
            log.warning(
                "authentication is off: anyone who can reach this port can classify and activate models"
            )
        if on_listening is not None:
            maybe = on_listening(port)
            if asyncio.iscoroutine(maybe):
                await maybe
        load_task = app[LIFECYCLE].load_task
        assert load_task is not None  # set when the runner started the app
        stop_task = asyncio.create_task(stop.wait())
        await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if load_task.done() and load_task.exception() is not None:
            stop_task.cancel()
            raise load_task.exception()  # type: ignore[misc]
        if load_task.done() and on_ready is not None:
            on_ready(str(engine.version))
        await stop_task
        log.info("shutting down: draining in-flight requests (up to %gs)", settings.shutdown_timeout_s)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        await runner.cleanup()
    log.info("stopped")


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return 0


def run_server(settings: ServerSettings, *, no_auth: bool = False, registry: Registry | None = None) -> None:
    """Blocking entry point: serve until SIGTERM/SIGINT, then drain and return."""
    asyncio.run(serve(settings, no_auth=no_auth, registry=registry))


def _default(name: str) -> str:
    """What an option falls back to when neither it nor its CLASSIFIER_* variable is set: the setting's own
    default (for the engine's settings, EngineConfig's), shown in --help."""
    return str(ServerSettings.model_fields[name].default)


# Every option defaults to None, "not given", so that the CLASSIFIER_* variable (or else the setting's own
# default, shown in brackets) applies.
def serve_command(
    host: Annotated[
        str | None,
        typer.Option(help="Interface to listen on (env CLASSIFIER_HOST)", show_default=_default("host")),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (env CLASSIFIER_PORT)", show_default=_default("port"))
    ] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Serve without tokens (local experiments only)")
    ] = False,
    version: Annotated[
        str | None,
        typer.Option(
            "--version", help="Serve this version (e.g. v3) instead of following the registry's active one"
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="auto, cpu, cuda or cuda:N (env CLASSIFIER_DEVICE)", show_default=_default("device")
        ),
    ] = None,
    cpu_threads: Annotated[
        int | None, typer.Option(help="Torch CPU threads.", show_default="torch's choice")
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the model at load time",
            show_default=f"--{'' if EngineConfig.compile else 'no-'}compile",
        ),
    ] = None,
    bf16: Annotated[
        bool | None,
        typer.Option(
            "--bf16/--no-bf16",
            help="bf16 autocast",
            show_default="on for CUDA; on CPUs only with AVX512-BF16/AMX",
        ),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="torch, onnx (ONNX Runtime, CPU) or auto: onnx on the CPU (env CLASSIFIER_BACKEND)",
            show_default=_default("backend"),
        ),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="onnx precision: none, int8, or auto: int8 when it costs at most 0.5 points of held-out "
            "accuracy (env CLASSIFIER_QUANTIZE)",
            show_default=_default("quantize"),
        ),
    ] = None,
    max_batch_tokens: Annotated[
        int | None,
        typer.Option(help="Padded tokens per forward pass", show_default="2048 on CPU, 16384 on CUDA"),
    ] = None,
    max_wait_ms: Annotated[
        float | None,
        typer.Option(help="How long a request waits to be batched", show_default=_default("max_wait_ms")),
    ] = None,
    queue_size: Annotated[
        int | None, typer.Option(help="Texts queued before 503 overload", show_default=_default("queue_size"))
    ] = None,
    poll_interval: Annotated[
        float | None,
        typer.Option(
            help="Seconds between checks of the registry's ACTIVE pointer; 0 disables",
            show_default=_default("poll_interval_s"),
        ),
    ] = None,
    request_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds before a classify call gives up", show_default=_default("request_timeout_s")
        ),
    ] = None,
    shutdown_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds in-flight requests may take to finish on SIGTERM",
            show_default=_default("shutdown_timeout_s"),
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR")] = "INFO",
) -> None:
    """Serve the classifier over HTTP (the registry's active version; tokens from CLASSIFIER_TOKEN and
    CLASSIFIER_ADMIN_TOKEN)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(
            no_auth=no_auth,
            host=host,
            port=port,
            version=version,
            device=device,
            cpu_threads=cpu_threads,
            compile=compile,
            bf16=bf16,
            backend=backend,
            quantize=quantize,
            max_batch_tokens=max_batch_tokens,
            max_wait_ms=max_wait_ms,
            queue_size=queue_size,
            poll_interval_s=poll_interval,
            request_timeout_s=request_timeout,
            shutdown_timeout_s=shutdown_timeout,
        )
        run_server(settings, no_auth=no_auth)
    except (ConfigError, RegistryError, ModelLoadError, ValueError) as exc:  # ValueError: e.g. no CUDA
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    typer.run(serve_command)

"""The bot's way to classify: one interface, three implementations chosen by configuration.

- ``ChildClassifier``: the embedded default; an Engine in a child process the bot starts and stops
  (``classifier.child``), reached over loopback HTTP, so forward passes never compete with the event loop.
- ``LocalClassifier``: an in-process Engine (no HTTP), started on first use: tests, benchmarks.
- ``HttpClassifier``: a ``triage serve`` server elsewhere (e.g. on a GPU), with timeouts and retries.

All validate input the same way and raise the same errors::

    classifier = make_classifier(settings.classifier_url, settings.classifier_token)
    try:
        result = await classifier.classify([message.text])
    except ClassifierUnavailable:
        ...  # keep the message as pending; classify it later
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import aiohttp
from pydantic import BaseModel, ValidationError

from classifier.child import ClassifierProcess, ClassifierStartError
from classifier.engine import Engine, EngineConfig, EngineError, EngineOverloaded
from classifier.logsafe import redact_url
from classifier.model import ModelLoadError
from classifier.paths import registry_dir
from classifier.registry import Registry, RegistryError
from classifier.results import (
    Activation,
    ClassifierError,
    ClassifierUnavailable,
    ClassifyResponse,
    ClassifyResult,
    InvalidInput,
    ModelList,
    ModelSummary,
    check_neighbors,
    check_texts,
    model_summary,
)
from classifier.retry import RetryPolicy

__all__ = [
    "ChildClassifier",
    "Classifier",
    "ClassifierError",
    "ClassifierUnavailable",
    "ClassifyResult",
    "HttpClassifier",
    "InvalidInput",
    "LocalClassifier",
    "ModelSummary",
    "RetryPolicy",
    "make_classifier",
]

log = logging.getLogger(__name__)
Answer = TypeVar("Answer", bound=BaseModel)


@runtime_checkable
class Classifier(Protocol):
    """What the bot needs from a classifier, in-process or remote."""

    async def classify(self, texts: Sequence[str], neighbors: int = 0) -> ClassifyResult:
        """1..256 texts (each up to 20,000 characters) -> results in input order, from one model version;
        ``neighbors``: also that many similar training messages per text (``TextResult.neighbors``).

        Raises InvalidInput (do not retry), ClassifierUnavailable (keep pending, retry later),
        ClassifierError (misconfiguration, e.g. a rejected token).
        """
        ...

    async def models(self) -> list[ModelSummary]:
        """All registry versions; ``serving`` marks the one answering now."""
        ...

    async def activate(self, name: str) -> str:
        """Make ``name`` the active version (the classifier switches without a restart); returns it."""
        ...

    async def close(self) -> None: ...


class LocalClassifier:
    """An in-process Engine behind the Classifier interface; the engine starts on the first call.

    Until a model exists (nothing trained yet) calls raise ClassifierUnavailable, and each later call
    tries again, so the bot can start before the first training.
    """

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        registry: Registry | None = None,
        config: EngineConfig | None = None,
        retry: RetryPolicy | None = None,
    ):
        self.engine = engine or Engine(registry or Registry(registry_dir()), config)
        self.retry = retry or RetryPolicy()
        self._start_lock = asyncio.Lock()
        self._started = False

    async def _ready(self) -> Engine:
        if not self._started:
            async with self._start_lock:
                if not self._started:
                    try:
                        await self.engine.start()
                    except (RegistryError, ModelLoadError) as exc:
                        raise ClassifierUnavailable(f"no model to classify with: {exc}") from exc
                    self._started = True
        return self.engine

    async def classify(self, texts: Sequence[str], neighbors: int = 0) -> ClassifyResult:
        texts = check_texts(texts)
        engine = await self._ready()

        async def once() -> ClassifyResult:
            try:
                return await engine.classify(texts, neighbors)
            except EngineError as exc:
                raise ClassifierUnavailable(str(exc)) from exc

        try:  # only overload is waited out: not ready means shutting down, where waiting will not help
            return await self.retry.call(once, retry_on=EngineOverloaded)
        except EngineOverloaded as exc:
            raise ClassifierUnavailable(
                f"classifier overloaded after {self.retry.attempts} attempts: {exc}",
                retry_after_s=exc.retry_after_s,
            ) from None

    async def models(self) -> list[ModelSummary]:
        registry = self.engine.registry
        versions = await asyncio.to_thread(registry.list)
        return [model_summary(v, self.engine.version) for v in versions]

    async def activate(self, name: str) -> str:
        """Load and switch first, then record it in the registry (a broken version is refused)."""
        engine = await self._ready()
        try:
            await engine.swap_to(name)
            await asyncio.to_thread(engine.registry.activate, name, "activated via the classifier client")
        except (RegistryError, ModelLoadError) as exc:
            raise ClassifierError(str(exc)) from exc
        return name

    async def close(self) -> None:
        await self.engine.close()


class HttpClassifier:
    """A ``triage serve`` server. Retries 502/503/504, timeouts and connection errors with backoff, then
    raises ClassifierUnavailable. ``admin_token`` is needed for ``models()`` and ``activate()``."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        admin_token: str | None = None,
        timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        session: aiohttp.ClientSession | None = None,
    ):
        self._url = url.rstrip("/")  # may carry a user and password (sent as basic auth): requests only
        self.url = redact_url(self._url)  # for messages and logs
        self._token = token
        self._admin_token = admin_token
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.retry = retry or RetryPolicy()
        self._session = session
        self._owns_session = session is None

    def __repr__(self) -> str:  # never show the tokens or the URL's password
        return f"HttpClassifier({self.url!r})"

    async def classify(self, texts: Sequence[str], neighbors: int = 0) -> ClassifyResult:
        texts = check_texts(texts)  # fail fast, without a round trip
        neighbors = check_neighbors(neighbors)
        request = {"texts": texts, "neighbors": neighbors} if neighbors else {"texts": texts}
        body = await self._request("POST", "/v1/classify", self._token, request)
        return self._answer(ClassifyResponse, body).result()

    async def models(self) -> list[ModelSummary]:
        body = await self._request("GET", "/v1/models", self._admin_token or self._token)
        return self._answer(ModelList, body).versions

    async def activate(self, name: str) -> str:
        body = await self._request("POST", f"/v1/models/{name}/activate", self._admin_token or self._token)
        return self._answer(Activation, body).active

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    def _answer(self, model: type[Answer], body: Any) -> Answer:
        """The server's answer as ``model``; a body of another shape (a wrong URL) is a ClassifierError."""
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
            raise ClassifierError(
                f"the classifier at {self.url} answered an unexpected body: {details}"
            ) from None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
            self._owns_session = True
        return self._session

    async def _request(
        self, method: str, path: str, token: str | None, payload: Any = None
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}

        async def once() -> Any:
            try:
                async with self._get_session().request(
                    method, self._url + path, json=payload, headers=headers, timeout=self.timeout
                ) as response:
                    if response.status in (502, 503, 504):  # overloaded, loading, or a proxy in between
                        retry_after = _retry_after(response.headers.get("Retry-After"))
                        raise _Transient(
                            f"HTTP {response.status}: {await _error_text(response)}", retry_after
                        )
                    if response.status >= 400:
                        raise _http_error(response.status, await _error_text(response), path)
                    return await response.json()
            except (aiohttp.ClientError, TimeoutError) as exc:  # connection refused/reset, timeout
                raise _Transient(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc

        try:
            return await self.retry.call(once, retry_on=_Transient)
        except _Transient as exc:
            raise ClassifierUnavailable(
                f"classifier at {self.url} unavailable after {self.retry.attempts} attempts ({exc})",
                retry_after_s=exc.retry_after_s,
            ) from None


class ChildClassifier:
    """The embedded default: an Engine in a child process (``classifier.child``), reached over loopback
    HTTP with tokens made for it, so forward passes never compete with the bot's event loop.

    ``start()`` (at the bot's start-up) loads the model when one exists and raises ClassifierStartError
    if the child cannot. Until a model exists calls raise ClassifierUnavailable and each later call looks
    again, as LocalClassifier does. A child that died is started again by the next call; a start that
    failed is logged in one line and not tried again for ``RESTART_PAUSE_S``.
    """

    RESTART_PAUSE_S = 30.0

    def __init__(
        self,
        registry: Registry | None = None,
        *,
        cpu_threads: int | None = None,
        retry: RetryPolicy | None = None,
        timeout_s: float = 40.0,  # beyond the server's own 30 s limit, which answers 503 first
    ):
        self.registry = registry or Registry(registry_dir())
        self.cpu_threads = cpu_threads
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s
        self.process: ClassifierProcess | None = None
        self._http: HttpClassifier | None = None
        self._lock = asyncio.Lock()
        self._failed: tuple[float, str] | None = None  # when the last start failed, and why

    async def start(self) -> None:
        """Start the child now if there is a model to serve; otherwise the first call after one exists."""
        if await asyncio.to_thread(self.registry.active_name) is None:
            log.info("no model yet: the classifier process starts once one is trained")
            return
        await self._running(report=False)  # the caller reports it: one line, not two

    async def classify(self, texts: Sequence[str], neighbors: int = 0) -> ClassifyResult:
        texts = check_texts(texts)
        return await (await self._running()).classify(texts, neighbors)

    async def models(self) -> list[ModelSummary]:
        if self._http is None and await asyncio.to_thread(self.registry.active_name) is None:
            return [model_summary(v, None) for v in await asyncio.to_thread(self.registry.list)]
        return await (await self._running()).models()

    async def activate(self, name: str) -> str:
        return await (await self._running()).activate(name)

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    async def _running(self, report: bool = True) -> HttpClassifier:
        """The client of a running child, started (again) if needed; ``report``: log a failed start."""
        async with self._lock:  # one start at a time; callers wait for it rather than fail
            if self._http is not None and self.process is not None and self.process.returncode is None:
                return self._http
            if self.process is not None:
                status = self.process.returncode
                log.warning("the classifier process exited (status %s): starting it again", status)
                await self._drop()
            if self._failed is not None and time.monotonic() - self._failed[0] < self.RESTART_PAUSE_S:
                raise ClassifierUnavailable(self._failed[1])
            if await asyncio.to_thread(self.registry.active_name) is None:
                raise ClassifierUnavailable(
                    f"no model to classify with: no active model in {self.registry.root}: "
                    "train one with `triage train`"
                )
            try:
                self._http = await self._spawn()
            except ClassifierStartError as exc:
                self._failed = (time.monotonic(), str(exc))
                if report:
                    log.error("%s", exc)
                raise
            self._failed = None
            return self._http

    async def _spawn(self) -> HttpClassifier:
        process = ClassifierProcess(
            token=secrets.token_urlsafe(32),
            admin_token=secrets.token_urlsafe(32),  # /triage models and rollback need it
            registry_root=self.registry.root,
            cpu_threads=self.cpu_threads,
        )
        try:
            port = await process.start()
            version = await process.ready()
        except BaseException:
            await process.stop()
            raise
        self.process = process
        log.info("classifier process %s serving %s on 127.0.0.1:%d", process.pid, version, port)
        return HttpClassifier(
            f"http://127.0.0.1:{port}",
            process.token,
            admin_token=process.admin_token,
            timeout_s=self.timeout_s,
            retry=self.retry,
        )

    async def _drop(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self.process is not None:
            await self.process.stop()
        self._http = self.process = None


class _Transient(Exception):
    """A failed request that a later try may get through: 502/503/504, a timeout, a refused connection."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _retry_after(value: str | None) -> float | None:
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, float(value))  # type: ignore[arg-type]
    return None


async def _error_text(response: aiohttp.ClientResponse) -> str:
    try:
        body = await response.json(content_type=None)
        if isinstance(body, dict) and "error" in body:
            return str(body["error"])
    except (ValueError, aiohttp.ClientError):
        pass
    return response.reason or ""


def _http_error(status: int, message: str, path: str) -> ClassifierError:
    if status in (400, 413, 422):
        return InvalidInput(message)
    if status in (401, 403):
        return ClassifierError(f"the classifier refused the token for {path} (HTTP {status}): {message}")
    if status >= 500:  # a server-side failure that retrying now will not fix; keep the message pending
        return ClassifierUnavailable(f"classifier error (HTTP {status}): {message}")
    return ClassifierError(f"HTTP {status} from {path}: {message}")


def make_classifier(
    url: str | None,
    token: str | None,
    *,
    admin_token: str | None = None,
    registry: Registry | None = None,
    engine_config: EngineConfig | None = None,
    timeout_s: float = 10.0,
    retry: RetryPolicy | None = None,
    embedded: Literal["process", "thread"] = "process",
) -> Classifier:
    """HttpClassifier when ``url`` is set, else the embedded classifier on ``registry`` (default
    ``$TRIAGE_DATA_DIR/models``): ChildClassifier (``embedded="process"``), or LocalClassifier in this
    process (``"thread"``). ``engine_config`` is the in-process engine's; a child takes its CPU threads."""
    if url:
        return HttpClassifier(url, token, admin_token=admin_token, timeout_s=timeout_s, retry=retry)
    if embedded == "process":
        threads = engine_config.cpu_threads if engine_config else None
        return ChildClassifier(registry, cpu_threads=threads, retry=retry)
    return LocalClassifier(registry=registry, config=engine_config, retry=retry)

"""Inference engine: serves one registry version, batching concurrent requests in its own worker thread.

How a call flows::

    classify(texts)  (event loop)  ──▶  bounded queue of texts  ──▶  worker thread:
        wait up to max_wait_ms for company, take a pool of queued texts, tokenize, sort by length,
        forward pass per micro-batch of at most max_batch_tokens  ──▶  future resolved on the loop

Sorting a pool of several batches' worth puts texts of similar length together, so padding stays small;
each forward pass stays small enough to be cache-friendly on a CPU. When a pool fails, each of its calls
is run again on its own: one call that breaks inference fails alone, not everyone batched with it.

A forward pass runs on PyTorch or, by default on the CPU, on ONNX Runtime (``onnx_backend.py``: the
version's ONNX files are made once, in the loader thread, and int8 is used where it keeps accuracy).
Tokenization, micro-batching and padding are ``model.py``'s inference path, which evaluation runs too.

The event loop only appends to the queue and awaits a future; tokenization and forward passes never run
on it. A call is bound to the model version that is current when it is queued, so a hot swap never mixes
versions inside one call: calls queued before the switch finish on the old model, later ones use the new.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from prometheus_client import Counter, Histogram
from transformers import PreTrainedTokenizerBase

from classifier.calibration import calibrate
from classifier.logsafe import escape_controls
from classifier.model import (
    ModelLoadError,
    MultiHeadClassifier,
    Runner,
    batch_limits,
    micro_batches,
    pad_batch,
    pad_token_id,
    resolve_device,
    run_padded,
    to_predictions,
    tokenize,
    torch_runner,
    use_bf16,
)
from classifier.neighbors import NeighborIndex, PooledRunner, normalized, torch_pooled_runner
from classifier.onnx_backend import load_onnx, resolve_backend
from classifier.registry import Registry, RegistryError, VersionInfo
from classifier.results import (
    DEFAULT_BACKEND,
    DEFAULT_QUANTIZE,
    MAX_TEXTS,
    Backend,
    ClassifierUnavailable,
    ClassifyResult,
    HeadPrediction,
    Neighbor,
    Quantize,
    TextResult,
    check_neighbors,
    check_texts,
)
from classifier.schema import LabelSchema

log = logging.getLogger(__name__)

# Process-wide metrics (registry=None: each server app registers them in its own CollectorRegistry).
BATCH_TEXTS = Histogram(
    "triage_classifier_batch_texts",
    "Texts per forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=None,
)
BATCH_TOKENS = Histogram(
    "triage_classifier_batch_tokens",
    "Padded tokens per forward pass",
    buckets=(32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768),
    registry=None,
)
FORWARD_SECONDS = Histogram(
    "triage_classifier_forward_seconds",
    "Duration of one forward pass (tokenization excluded)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=None,
)
SWAPS = Counter("triage_classifier_model_swaps_total", "Model version switches", ["result"], registry=None)
ENGINE_METRICS = (BATCH_TEXTS, BATCH_TOKENS, FORWARD_SECONDS, SWAPS)

POOL_BATCHES = 8  # the worker takes up to this many batches' worth of queued texts, to sort them by length


class EngineOverloaded(ClassifierUnavailable):
    """The queue is full; try again after ``retry_after_s``."""


class EngineNotReady(ClassifierUnavailable):
    """No model loaded yet, or the engine is shutting down."""


class EngineError(RuntimeError):
    """Tokenization or a forward pass failed (a bug, an out-of-memory, a text the tokenizer cannot take).

    Calls batched together are then run again one by one, so only the call that fails alone gets this.
    """


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. ``poll_interval_s``: how often to check the registry's ACTIVE pointer
    (``None`` or 0: never follow it)."""

    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    cpu_threads: int | None = None  # torch intra-op threads (process-wide); None: torch's default
    compile: bool = False  # torch.compile the model at load time (warm-up compiles it)
    # bf16 autocast. None: as evaluation computes (model.use_bf16: on for CUDA, off on the CPU)
    bf16: bool | None = None
    # "onnx": ONNX Runtime (CPU only; the ONNX files are made once per version, see onnx_backend.py);
    # "auto": onnx on the CPU, torch on CUDA
    backend: Backend = DEFAULT_BACKEND
    # onnx precision: "int8" (dynamic quantization), "none" (fp32), or "auto": int8 when the version's
    # held-out check found it costs at most half a point of accuracy, else fp32
    quantize: Quantize = DEFAULT_QUANTIZE
    # padded tokens per forward pass. None: as evaluation batches (model.batch_limits: 2048 on CPU, 16384
    # on CUDA)
    max_batch_tokens: int | None = None
    max_wait_ms: float = 5.0  # how long the first queued text waits for company
    queue_size: int = 2048  # texts waiting (not yet in a forward pass) before callers get EngineOverloaded
    poll_interval_s: float | None = 5.0

    def __post_init__(self) -> None:
        if self.queue_size < MAX_TEXTS:
            raise ValueError(f"queue_size must be at least {MAX_TEXTS} (one full request)")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 16:
            raise ValueError("max_batch_tokens must be at least 16")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError("cpu_threads must be at least 1")
        if self.backend not in get_args(Backend):
            raise ValueError(f"backend must be one of {', '.join(get_args(Backend))}, got {self.backend!r}")
        if self.quantize not in get_args(Quantize):
            raise ValueError(
                f"quantize must be one of {', '.join(get_args(Quantize))}, got {self.quantize!r}"
            )


@dataclass
class LoadedModel:
    """One version ready to serve; ``backend`` says how it runs (torch, torch-bf16, onnx-fp32, onnx-int8)."""

    info: VersionInfo
    schema: LabelSchema
    runner: Runner
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    pad_id: int
    backend: str
    # why this label: the version's training embeddings, and a runner that also returns the text's
    # (None when the version saved none, or its ONNX files predate the pooled output)
    neighbors: NeighborIndex | None = None
    pooled_runner: PooledRunner | None = None

    @property
    def name(self) -> str:
        return self.info.name


@dataclass(eq=False)
class _Call:
    """One classify() call: filled in by the worker, resolved on the caller's loop."""

    loaded: LoadedModel
    texts: list[str]
    future: asyncio.Future[ClassifyResult]
    loop: asyncio.AbstractEventLoop
    neighbors: int = 0  # similar training messages asked for per text
    results: list[TextResult | None] = field(default_factory=list)
    remaining: int = 0
    abandoned: bool = False  # caller gone (cancelled) or the call already failed: skip its texts


@dataclass(eq=False)
class _Item:
    call: _Call
    index: int
    est_tokens: int
    enqueued: float


@dataclass
class EngineStats:
    """Counters for tests and the benchmark (Prometheus has the same, process-wide)."""

    batches: int = 0
    texts: int = 0
    max_batch_texts: int = 0
    max_padded_tokens: int = 0
    tokens: int = 0  # real tokens run
    padded_tokens: int = 0  # tokens including padding: tokens / padded_tokens is the padding efficiency


class Engine:
    """Serve a registry version with micro-batching; ``start()`` it, then ``await classify(texts)``.

    ``version``: serve that version instead of the active one; a pinned engine does not follow ACTIVE
    (``swap_to`` still works).
    """

    def __init__(self, registry: Registry, config: EngineConfig | None = None, version: str | None = None):
        self.registry = registry
        self.config = config or EngineConfig()
        self.device = resolve_device(self.config.device)
        self.backend = resolve_backend(self.config.backend, self.config.quantize, self.device)
        # Cutting a batch where lengths jump pays when it saves more padding than ``batch_cost`` tokens.
        self.max_batch_tokens, self.batch_cost = batch_limits(self.device, self.config.max_batch_tokens)
        self.stats = EngineStats()
        self._pinned = version
        self._current: LoadedModel | None = None
        self._queue: deque[_Item] = deque()
        self._queued_tokens = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._swap_lock: asyncio.Lock | None = None
        self._poller: asyncio.Task[None] | None = None
        self._seen_active: str | None = None
        self._throughput = 0.0  # texts/s, moving average: sizes the Retry-After hint

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the pinned or active version (off the loop), start the worker and the ACTIVE poller."""
        if self._thread is not None:
            return
        if self.config.cpu_threads:
            torch.set_num_threads(self.config.cpu_threads)
        self._swap_lock = asyncio.Lock()
        active = await asyncio.to_thread(self.registry.active_name)
        self._seen_active = active
        name = self._pinned or active
        if name is None:
            raise RegistryError(f"no active model in {self.registry.root}: train one with `triage train`")
        await self.swap_to(name)
        self._thread = threading.Thread(target=self._work, name="triage-engine", daemon=True)
        self._thread.start()
        if self.config.poll_interval_s and self._pinned is None:
            self._poller = asyncio.create_task(self._follow_active(self.config.poll_interval_s))

    async def close(self) -> None:
        """Stop taking calls, finish every queued one, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- state -------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._current is not None and not self._closing

    @property
    def version(self) -> str | None:
        current = self._current
        return current.name if current else None

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    @property
    def queue_depth(self) -> int:
        """Texts waiting for a forward pass."""
        return len(self._queue)

    # ---- classify ----------------------------------------------------------------------------------
    async def classify(self, texts: Sequence[str], neighbors: int = 0) -> ClassifyResult:
        """Classify 1..256 texts with one model version; results in input order. ``neighbors``: also
        return that many similar training messages of each text's predicted topic (why this label).

        Raises InvalidInput, EngineOverloaded (queue full), EngineNotReady, EngineError.
        """
        texts = check_texts(texts)
        neighbors = check_neighbors(neighbors)
        loaded = self._current  # binds the call to one version (a swap later does not affect it)
        if loaded is None or self._closing or self._thread is None:
            raise EngineNotReady("the classifier is not ready" if not self._closing else "shutting down")
        loop = asyncio.get_running_loop()
        call = _Call(loaded, texts, loop.create_future(), loop, neighbors, [None] * len(texts), len(texts))
        now = time.monotonic()
        # A cheap token estimate (~4 characters per token) sizes batches before the worker tokenizes.
        items = [_Item(call, i, min(loaded.max_length, len(t) // 4 + 3), now) for i, t in enumerate(texts)]
        with self._cond:  # held by the worker only for queue operations, never during compute
            if self._closing:  # checked again under the lock: the worker may be about to exit
                raise EngineNotReady("shutting down")
            if len(self._queue) + len(items) > self.config.queue_size:
                raise EngineOverloaded(
                    f"classifier queue full ({len(self._queue)} texts waiting)",
                    retry_after_s=self._retry_after(),
                )
            self._queue.extend(items)
            self._queued_tokens += sum(it.est_tokens for it in items)
            self._cond.notify()
        try:
            return await call.future
        except asyncio.CancelledError:
            call.abandoned = True  # the worker skips texts it has not started yet
            raise

    def _retry_after(self) -> float:
        if self._throughput <= 0:
            return 1.0
        return float(min(30, max(1, math.ceil(len(self._queue) / self._throughput))))

    # ---- versions ----------------------------------------------------------------------------------
    async def swap_to(self, name: str) -> VersionInfo:
        """Load ``name`` beside the current version (off the loop), warm it up, then switch atomically.

        Raises RegistryError (unknown version) or ModelLoadError; on error the current version keeps serving.
        """
        if self._swap_lock is None:
            self._swap_lock = asyncio.Lock()
        async with self._swap_lock:  # one load at a time: two models in memory at most, not three
            current = self._current
            if current is not None and current.name == name:
                return current.info
            try:
                loaded = await asyncio.to_thread(self._load, name)
            except Exception:
                SWAPS.labels(result="failed").inc()
                raise
            self._current = loaded  # one reference assignment: the switch is atomic
            SWAPS.labels(result="ok").inc()
            log.info(
                "serving model %s on %s%s", name, loaded.backend, f" (was {current.name})" if current else ""
            )
            return loaded.info

    async def _follow_active(self, interval_s: float) -> None:
        """Switch when the registry's ACTIVE pointer changes (another process activated or promoted)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                active = await asyncio.to_thread(self.registry.active_name)
            except OSError as exc:
                log.warning("cannot read the registry's ACTIVE pointer: %s", exc)
                continue
            # Only a change of the pointer counts: an explicit swap_to() is not undone, and a version
            # that fails to load is not retried every few seconds.
            if active == self._seen_active:
                continue
            self._seen_active = active
            if active is None or active == self.version:
                continue
            try:
                await self.swap_to(active)
            except Exception as exc:
                log.error(
                    "ACTIVE points to %s but it cannot be served (%s); still serving %s",
                    active,
                    exc,
                    self.version,
                )

    def _load(self, name: str) -> LoadedModel:
        """Runs in a loader thread while the worker keeps serving the old version."""
        info = self.registry.get(name)
        loaded: LoadedModel | None = None
        if self.backend == "onnx":
            try:
                loaded = self._load_onnx(info)
            except ModelLoadError as exc:
                if self.config.backend != "auto":  # asked for ONNX by name: say it cannot be done
                    raise
                # chosen for speed only: a version that cannot be exported (a full or read-only disk)
                # is still served, more slowly; a version broken for PyTorch too fails with its error
                loaded = self._load_torch(info)
                log.warning("%s: serving it on PyTorch instead", escape_controls(exc))
        loaded = loaded or self._load_torch(info)
        try:
            self._warm_up(loaded)
        except Exception as exc:
            if not (self.config.compile and loaded.backend.startswith("torch")):
                raise
            log.warning("torch.compile failed for %s (%s); serving it without compilation", name, exc)
            loaded = self._load_torch(info, compile=False)
            self._warm_up(loaded)
        return loaded

    def _load_onnx(self, info: VersionInfo) -> LoadedModel:
        schema, tokenizer, max_length = MultiHeadClassifier.load_parts(Path(info.path))
        session = load_onnx(info, self.config.quantize, self.config.cpu_threads)  # exports once
        pooled_runner = session.with_pooled if session.has_pooled else None
        return self._loaded(
            info, schema, session, tokenizer, max_length, f"onnx-{session.precision}", pooled_runner
        )

    def _load_torch(self, info: VersionInfo, compile: bool | None = None) -> LoadedModel:
        model, tokenizer, max_length = MultiHeadClassifier.load(Path(info.path))
        model.to(self.device)
        bf16 = use_bf16(self.device, self.config.bf16)
        compiled = self.config.compile if compile is None else compile
        runner = torch_runner(model, self.device, bf16, compiled)
        backend = "torch-bf16" if bf16 else "torch"
        pooled_runner = torch_pooled_runner(model, self.device, bf16)
        return self._loaded(info, model.schema, runner, tokenizer, max_length, backend, pooled_runner)

    def _loaded(
        self,
        info: VersionInfo,
        schema: LabelSchema,
        runner: Runner,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        backend: str,
        pooled_runner: PooledRunner | None,
    ) -> LoadedModel:
        neighbors = NeighborIndex.load(info.files.neighbors, info.files.dataset)
        return LoadedModel(
            info,
            schema,
            runner,
            tokenizer,
            max_length,
            pad_token_id(tokenizer),
            backend,
            neighbors,
            pooled_runner,
        )

    def _warm_up(self, loaded: LoadedModel) -> None:
        """Run two shapes before the switch, so compilation and lazy CUDA set-up don't hit a request."""
        for texts in (["warm up"], ["warm up the model with a longer message " * 4] * 3):
            ids, _ = tokenize(loaded.tokenizer, texts, loaded.max_length)
            _forward(loaded, ids)

    # ---- worker ------------------------------------------------------------------------------------
    def _work(self) -> None:
        while (items := self._take()) is not None:
            started = time.monotonic()
            self._process(items)
            elapsed = time.monotonic() - started
            if elapsed > 0:
                rate = len(items) / elapsed
                self._throughput = rate if self._throughput == 0 else 0.8 * self._throughput + 0.2 * rate
        log.debug("engine worker stopped")

    def _take(self) -> list[_Item] | None:
        """Block until texts are queued, give them max_wait_ms to gather, and take a pool of up to
        POOL_BATCHES batches' worth (estimated). Returns None when closing and the queue is drained.
        """
        max_tokens = self.max_batch_tokens
        pool_tokens = max_tokens * POOL_BATCHES
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            # Texts that already waited (e.g. during the previous forward pass) are taken at once.
            deadline = self._queue[0].enqueued + self.config.max_wait_ms / 1000
            while self._queued_tokens < max_tokens and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            loaded = self._queue[0].call.loaded
            taken: list[_Item] = []
            tokens = 0
            # FIFO, and only texts bound to the same version (calls queued before a swap come first).
            while self._queue and self._queue[0].call.loaded is loaded:
                if taken and tokens + self._queue[0].est_tokens > pool_tokens:
                    break
                item = self._queue.popleft()
                tokens += item.est_tokens
                taken.append(item)
            self._queued_tokens -= tokens
            return taken

    def _process(self, items: list[_Item]) -> None:
        """Run a pool; if it fails, run each of its calls on its own, so one bad call fails alone."""
        items = [it for it in items if not it.call.abandoned]
        if not items:
            return
        calls = list(dict.fromkeys(it.call for it in items))
        try:
            self._infer(items)
            return
        except Exception as exc:
            if len(calls) == 1:
                self._fail(calls[0], exc)
                return
            log.warning(
                "inference failed for %d calls batched together (%s); retrying each alone",
                len(calls),
                escape_controls(exc),
            )
        for call in calls:
            left = [it for it in items if it.call is call and call.results[it.index] is None]
            if call.abandoned or not left:  # cancelled, or finished before the failure
                continue
            try:
                self._infer(left)
            except Exception as exc:
                self._fail(call, exc)

    def _fail(self, call: _Call, exc: Exception) -> None:
        log.error("inference failed for a call of %d texts", len(call.texts), exc_info=exc)
        if not call.abandoned and call.remaining > 0:
            call.abandoned = True
            _settle(call, EngineError(f"inference failed: {exc}"))

    def _infer(self, items: list[_Item]) -> None:
        """Tokenize, cut into micro-batches, run them; a call is settled as soon as its last text is done."""
        loaded = items[0].call.loaded
        ids, truncated = tokenize(
            loaded.tokenizer, [it.call.texts[it.index] for it in items], loaded.max_length
        )
        batches = micro_batches([len(x) for x in ids], self.max_batch_tokens, self.batch_cost)
        # Oldest text first, so a long text sorted into the last batch does not wait longest.
        batches.sort(key=lambda batch: min(items[i].enqueued for i in batch))
        for batch in batches:
            rows = [ids[i] for i in batch]
            started = time.monotonic()
            if any(items[i].call.neighbors for i in batch) and loaded.pooled_runner and loaded.neighbors:
                probs, pooled = _forward_pooled(loaded, rows)
            else:
                probs, pooled = _forward(loaded, rows), None
            FORWARD_SECONDS.observe(time.monotonic() - started)
            padded = len(rows) * max(len(r) for r in rows)
            BATCH_TEXTS.observe(len(rows))
            BATCH_TOKENS.observe(padded)
            self.stats.batches += 1
            self.stats.texts += len(rows)
            self.stats.max_batch_texts = max(self.stats.max_batch_texts, len(rows))
            self.stats.max_padded_tokens = max(self.stats.max_padded_tokens, padded)
            self.stats.tokens += sum(len(r) for r in rows)
            self.stats.padded_tokens += padded
            for row, i in enumerate(batch):
                item = items[i]
                heads = to_predictions(loaded.schema, probs, row)
                item.call.results[item.index] = TextResult(
                    heads=heads,
                    truncated=truncated[i],
                    neighbors=_why(loaded, heads, pooled, row, item.call.neighbors),
                )
                item.call.remaining -= 1
                if item.call.remaining == 0:
                    _settle(item.call, ClassifyResult(loaded.name, list(item.call.results)))  # type: ignore[arg-type]


def _settle(call: _Call, outcome: ClassifyResult | BaseException) -> None:
    """Hand a result or error to the caller's loop (futures are not thread-safe)."""

    def settle() -> None:
        if call.future.done():  # cancelled meanwhile
            return
        if isinstance(outcome, BaseException):
            call.future.set_exception(outcome)
        else:
            call.future.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        call.loop.call_soon_threadsafe(settle)


def _forward_pooled(loaded: LoadedModel, rows: list[list[int]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """As ``_forward``, also returning the pooled embeddings (only for batches asking why)."""
    assert loaded.pooled_runner is not None
    probs, pooled = loaded.pooled_runner(*pad_batch(rows, loaded.pad_id))
    return calibrate(probs, loaded.info.temperatures), pooled


def _why(
    loaded: LoadedModel, heads: dict[str, HeadPrediction], pooled: np.ndarray | None, row: int, k: int
) -> list[Neighbor] | None:
    """The ``k`` training messages nearest a text, of its predicted label; None when not asked for."""
    if not k:
        return None
    index = loaded.neighbors
    if index is None or pooled is None or index.head not in heads:
        return []
    return index.nearest(normalized(pooled[row]), heads[index.head].label, k)


def _forward(loaded: LoadedModel, rows: list[list[int]]) -> dict[str, np.ndarray]:
    """Class probabilities per head as served (calibrated), for tokenized rows (right-padded here)."""
    return calibrate(run_padded(loaded.runner, rows, loaded.pad_id), loaded.info.temperatures)

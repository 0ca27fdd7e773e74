"""Serving benchmark: naive per-message inference vs the batching engine vs the HTTP server.

    .venv/bin/python bench/serve.py                      # CPU, default model, 30 s per phase
    .venv/bin/python bench/serve.py --duration 60 --concurrency 64 --json bench-serve.json
    .venv/bin/python bench/serve.py --banking77 ../shared/data/banking77/train.csv   # a trained model
    .venv/bin/python bench/serve.py --device cuda        # bf16 on a GPU, plus model-only sequences/s

Every phase is a closed loop of ``--concurrency`` clients, each sending one Slack-like message (mostly
5-60 words), waiting for the answer, and sending the next:

1. baseline: one forward pass per message (the model called directly, as a naive handler would; one
   at a time, since concurrent forward passes only fight over the same cores);
2. engine: ``Engine.classify([message])`` in-process (micro-batching), float32 like the baseline;
3. engine-bf16: the same with bf16 autocast (CPU only; pays with AVX512-BF16/AMX);
4. onnx-fp32: the engine on ONNX Runtime in float32 (CPU only);
5. onnx: the engine on ONNX Runtime as served by default on the CPU (int8 when the version's held-out
   check allows it, else float32);
6. http: ``triage serve`` in a subprocess (its default backend), ``POST /v1/classify`` over keep-alive
   connections (the load generator runs on the same machine and competes for its cores).

With ``--banking77 FILE`` the model is trained on BANKING77 (a linear probe: the packaged encoder as it
is, the topic head fitted on its pooled embeddings of the train and validation split; minutes on a CPU)
instead of untrained, and the accuracy of each backend on the held-out test split is reported beside
the speed: what int8 costs against the float32 model on real rows.

The phases take turns (``--rounds``), so that load from other processes on a shared machine hits all of
them alike. Throughput is messages answered per second within the measured windows (each after a short
warm-up); latency is per message, from sending to answer, so it includes queueing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable as `python bench/serve.py` from a checkout

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.machine import cpu_name  # noqa: E402
from classifier.data import DEFAULT_SPLIT_SALT, load_examples, split_examples, write_jsonl  # noqa: E402
from classifier.engine import Engine, EngineConfig  # noqa: E402
from classifier.model import (  # noqa: E402
    MultiHeadClassifier,
    autocast_context,
    pad_batch,
    predict_probs,
    resolve_device,
    to_predictions,
    torch_runner,
)
from classifier.onnx_backend import (  # noqa: E402
    OnnxModel,
    accuracy_by_head,
    ensure_onnx,
    heldout_examples,
    onnx_folder,
)
from classifier.paths import default_base_model  # noqa: E402
from classifier.registry import Registry, VersionFiles, VersionInfo  # noqa: E402
from classifier.schema import LabelSchema  # noqa: E402

TOKEN = "bench-token-" + "0" * 20
PHASES = ("baseline", "engine", "engine-bf16", "onnx-fp32", "onnx", "http")

_VOCABULARY = (
    "the a our my we I you it is was can't cannot please help urgent asap today again still not working "
    "invoice charged twice refund billing payment card subscription plan upgrade downgrade cancel account "
    "login password reset email sso 2fa locked out dashboard export csv report api key token webhook "
    "integration slack error 500 timeout slow down outage crash bug page blank mobile app ios android "
    "feature request would love dark mode filter search bulk edit thanks great awesome frustrated angry "
    "customers team admin users permissions settings since yesterday morning after update release"
)
WORDS = _VOCABULARY.split()


def slack_messages(n: int, seed: int = 0) -> list[str]:
    """Messages with Slack-like lengths: mostly 5-60 words, a few one-liners and a few long pastes."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.05:
            words = rng.randint(1, 4)
        elif r < 0.85:
            words = rng.randint(5, 60)
        elif r < 0.97:
            words = rng.randint(61, 150)
        else:
            words = rng.randint(151, 400)
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        out.append(text[0].upper() + text[1:] + rng.choice([".", "?", "!", "", " :("]))
    return out


@dataclass
class PhaseResult:
    name: str
    messages: int
    seconds: float
    messages_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    messages_per_cpu_s: float  # messages per CPU-second used (all threads): robust to other load


@dataclass
class Tally:
    """Completions and latencies of one phase, summed over its rounds."""

    name: str
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_s: float = 0.0
    errors: int = 0

    def result(self) -> PhaseResult:
        lat = np.array(self.latencies) * 1000 if self.latencies else np.array([float("nan")])
        return PhaseResult(
            self.name,
            len(self.latencies),
            self.seconds,
            len(self.latencies) / self.seconds if self.seconds else 0.0,
            float(np.percentile(lat, 50)),
            float(np.percentile(lat, 99)),
            self.errors,
            len(self.latencies) / self.cpu_s if self.cpu_s else 0.0,
        )


async def closed_loop(
    tally: Tally,
    call: Callable[[str], Awaitable[Any]],
    messages: list[str],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    cpu_clock: Callable[[], float] = time.process_time,
) -> None:
    """``concurrency`` clients, each sending its next message as soon as the previous one is answered.

    Counts the answers that arrive within the measured window (after ``warmup_s``).
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, end = start + warmup_s, start + warmup_s + duration_s
    counter = itertools.count(random.randrange(len(messages)))

    async def client() -> None:
        while (sent := loop.time()) < end:
            text = messages[next(counter) % len(messages)]
            try:
                await call(text)
            except Exception as exc:
                tally.errors += 1
                if tally.errors <= 3:
                    print(f"  {tally.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            done = loop.time()
            if measure_from <= done <= end:
                tally.latencies.append(done - sent)

    async def cpu_window() -> None:
        await asyncio.sleep(warmup_s)
        started = cpu_clock()
        await asyncio.sleep(duration_s)
        tally.cpu_s += cpu_clock() - started

    await asyncio.gather(cpu_window(), *(client() for _ in range(concurrency)))
    tally.seconds += duration_s


def build_registry(data_dir: Path, base_model: Path, max_length: int) -> Registry:
    """An untrained multi-head model on the base encoder: accuracy is irrelevant for speed."""
    registry = Registry(data_dir / "models")
    torch.manual_seed(0)
    model, tokenizer = MultiHeadClassifier.from_base(base_model, LabelSchema())
    with registry.staging() as staging:
        model.save(staging, tokenizer, max_length=max_length)
        registry.commit(
            staging,
            VersionInfo(name="", created="", base_model=str(base_model), schema=model.schema.to_dict()),
        )
    return registry


def build_banking77_registry(data_dir: Path, base_model: Path, data: Path, max_length: int) -> Registry:
    """A topic model trained on BANKING77 as a linear probe (frozen encoder, logistic-regression head):
    real accuracy in minutes on a CPU, where fine-tuning would take hours."""
    from sklearn.linear_model import LogisticRegression

    examples, schema = load_examples([data], LabelSchema(heads={"topic": []}), infer_labels=True)
    splits = split_examples(examples)
    learn = splits["train"] + splits["validation"]
    model, tokenizer = MultiHeadClassifier.from_base(base_model, schema)
    model.eval()
    features = pooled_features(model, tokenizer, [ex.text for ex in learn], max_length)
    labels = schema.heads["topic"]
    probe = LogisticRegression(C=10.0, max_iter=2000)
    probe.fit(features, [labels.index(ex.labels["topic"]) for ex in learn])
    head = model.heads["topic"]
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(probe.coef_).float())
        head.bias.copy_(torch.from_numpy(probe.intercept_).float())
    registry = Registry(data_dir / "models")
    with registry.staging() as staging:
        model.save(staging, tokenizer, max_length=max_length)
        write_jsonl(VersionFiles(staging).dataset, examples)
        info = VersionInfo(
            name="",
            created="",
            base_model=str(base_model),
            schema=schema.to_dict(),
            train_config={"split": [0.8, 0.1, 0.1], "split_salt": DEFAULT_SPLIT_SALT, "probe": "logistic"},
            data={"examples": len(examples), "test_split": "test"},
        )
        registry.commit(staging, info)
    return registry


@torch.inference_mode()
def pooled_features(
    model: MultiHeadClassifier, tokenizer: Any, texts: list[str], max_length: int, batch_size: int = 64
) -> np.ndarray:
    rows = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(rows[i]))
    out = np.zeros((len(texts), int(model.encoder.config.hidden_size)), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad_batch([rows[i] for i in idx], tokenizer.pad_token_id or 0)
        out[idx] = model.pool(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    return out


def heldout_accuracy(registry: Registry, cpu_threads: int | None) -> dict[str, Any]:
    """Accuracy of each backend on the active version's held-out rows, and points lost against fp32."""
    info = registry.active()
    heldout = heldout_examples(info)
    if not heldout:
        return {}
    onnx_report = ensure_onnx(info)
    model, tokenizer, max_length = MultiHeadClassifier.load(Path(info.path))
    texts = [ex.text for ex in heldout]
    cpu = torch.device("cpu")
    runners = {
        "torch-fp32": torch_runner(model, cpu, bf16=False, compile=False),
        "torch-bf16": torch_runner(model, cpu, bf16=True, compile=False),
        **{
            f"onnx-{precision}": OnnxModel(onnx_folder(Path(info.path)), precision, model.schema, cpu_threads)
            for precision in ("fp32", "int8")
        },
    }
    accuracy = {
        name: accuracy_by_head(
            model.schema, heldout, predict_probs(run, model.schema, tokenizer, texts, max_length, cpu)
        )
        for name, run in runners.items()
    }
    return {
        "rows": len(heldout),
        "accuracy": accuracy,
        "points_lost_vs_fp32": {
            name: {h: round((accuracy["torch-fp32"][h] - a) * 100, 2) for h, a in acc.items()}
            for name, acc in accuracy.items()
        },
        "onnx_report": asdict(onnx_report),
    }


def naive_predictor(registry: Registry, device: torch.device) -> Callable[[str], Any]:
    """One message per forward pass: what a handler calling the model directly does."""
    model, tokenizer, max_length = MultiHeadClassifier.load(Path(registry.active().path))
    model.to(device)

    @torch.inference_mode()
    def predict(text: str) -> Any:
        enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        with autocast_context(device):
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        probs = {h: torch.softmax(v.float(), -1).cpu().numpy() for h, v in logits.items()}
        return to_predictions(model.schema, probs, 0)

    return predict


def model_only(
    registry: Registry, device: torch.device, messages: list[str], batch_size: int, seconds: float
) -> float:
    """Forward passes alone on pre-tokenized, length-sorted batches: the hardware's ceiling (sequences/s)."""
    model, tokenizer, max_length = MultiHeadClassifier.load(Path(registry.active().path))
    model.to(device)
    ordered = sorted(messages, key=len)
    batches = []
    for i in range(0, len(ordered), batch_size):
        enc = tokenizer(
            ordered[i : i + batch_size],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        batches.append({k: enc[k].to(device) for k in ("input_ids", "attention_mask")})
    done, started = 0, time.perf_counter()
    with torch.inference_mode(), autocast_context(device):
        model(**batches[0])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        random.Random(0).shuffle(batches)  # a mix of lengths whenever the time is up
        started = time.perf_counter()
        for passes, batch in enumerate(itertools.cycle(batches), 1):
            model(**batch)
            done += batch["input_ids"].shape[0]
            if device.type == "cuda" and passes % 8:
                continue  # check the clock every 8 passes only: a sync per pass would starve the GPU
            if device.type == "cuda":
                torch.cuda.synchronize()
            if time.perf_counter() - started >= seconds:
                break
    return done / (time.perf_counter() - started)


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by another process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    messages = slack_messages(4000, args.seed)
    words = [len(m.split()) for m in messages]
    if args.registry:
        registry = Registry(Path(args.registry))
    elif args.banking77:
        print(f"training a linear probe on {args.banking77} ...", file=sys.stderr)
        registry = build_banking77_registry(
            Path(tempfile.mkdtemp(prefix="triage-bench-")) / "data",
            Path(args.model),
            Path(args.banking77),
            args.max_length,
        )
    else:
        print(f"building an untrained model on {args.model} ...", file=sys.stderr)
        registry = build_registry(
            Path(tempfile.mkdtemp(prefix="triage-bench-")) / "data", Path(args.model), args.max_length
        )
    print(
        f"model {registry.active().name} from {registry.root}; device {device}; torch threads "
        f"{torch.get_num_threads()}; {os.cpu_count()} CPUs",
        file=sys.stderr,
    )
    config = EngineConfig(
        device=args.device,
        cpu_threads=args.cpu_threads,
        compile=args.compile,
        bf16=True if args.bf16 else None,
        backend="torch",
        max_batch_tokens=args.max_batch_tokens,
        max_wait_ms=args.max_wait_ms,
        queue_size=max(2048, args.concurrency * 4),
        poll_interval_s=None,
    )
    phases = [p for p in PHASES if p in args.phases]
    if device.type == "cuda" or args.bf16:
        phases = [p for p in phases if p != "engine-bf16"]  # the engine phase already runs in bf16
    onnx_report = None
    if device.type == "cuda":
        phases = [p for p in phases if not p.startswith("onnx")]  # ONNX Runtime serves on the CPU
    elif any(p.startswith("onnx") or p == "http" for p in phases):
        print("making the ONNX files (export, int8 quantization and check) ...", file=sys.stderr)
        onnx_report = asdict(await asyncio.to_thread(ensure_onnx, registry.active()))
    tallies = {name: Tally(name) for name in phases}
    slice_s = args.duration / args.rounds
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        calls: dict[str, Callable[[str], Awaitable[Any]]] = {}
        clocks: dict[str, Callable[[], float]] = {}
        if "baseline" in phases:
            predict = naive_predictor(registry, device)
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=1))  # one forward pass at a time
            calls["baseline"] = lambda text: loop.run_in_executor(pool, predict, text)
        if "engine" in phases:
            engine = await stack.enter_async_context(Engine(registry, config))
            calls["engine"] = lambda text: engine.classify([text])
        if "engine-bf16" in phases:
            engine_bf16 = await stack.enter_async_context(Engine(registry, replace(config, bf16=True)))
            calls["engine-bf16"] = lambda text: engine_bf16.classify([text])
        for name, quantize in (("onnx-fp32", "none"), ("onnx", "auto")):
            if name in phases:
                onnx_engine = await stack.enter_async_context(
                    Engine(registry, replace(config, backend="onnx", quantize=quantize))
                )
                print(f"  {name}: {onnx_engine.current.backend}", file=sys.stderr)  # type: ignore[union-attr]
                calls[name] = lambda text, e=onnx_engine: e.classify([text])
        if "http" in phases:
            calls["http"], clocks["http"] = await stack.enter_async_context(http_client(args, registry))
        # Phases take turns, round after round: load from other processes on a shared machine then
        # hits all of them alike instead of whichever phase happened to run at the time.
        for round_no in range(args.rounds):
            for name in phases:
                print(f"round {round_no + 1}/{args.rounds}: {name} ...", file=sys.stderr)
                clock = clocks.get(name, time.process_time)
                await closed_loop(
                    tallies[name], calls[name], messages, args.concurrency, slice_s, args.warmup, clock
                )
        if "engine" in phases:
            print(
                f"  engine: {engine.stats.texts / max(engine.stats.batches, 1):.1f} texts per forward pass",
                file=sys.stderr,
            )

    accuracy = heldout_accuracy(registry, args.cpu_threads) if device.type == "cpu" else {}

    model_only_rate = None
    if args.model_only or device.type == "cuda":
        print("model only: pre-tokenized batches ...", file=sys.stderr)
        model_only_rate = model_only(
            registry,
            device,
            messages,
            args.model_only_batch or (256 if device.type == "cuda" else 32),
            min(args.duration, 10),
        )

    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "message_words": {
            "median": statistics.median(words),
            "p90": float(np.percentile(words, 90)),
            "share_5_60": float(np.mean([5 <= w <= 60 for w in words])),
        },
        "engine_config": asdict(config),
        "model": registry.active().name + (" (BANKING77 linear probe)" if args.banking77 else ""),
        "onnx": onnx_report,
        "heldout_accuracy": accuracy,
        "phases": {k: asdict(t.result()) for k, t in tallies.items()},
        "model_only_sequences_per_s": model_only_rate,
    }


@contextlib.asynccontextmanager
async def http_client(
    args: argparse.Namespace, registry: Registry
) -> AsyncIterator[tuple[Callable[[str], Any], Callable[[], float]]]:
    """Start ``triage serve`` in a subprocess on a free port; yield a function that classifies over HTTP
    and a CPU clock counting the server and this process (the load generator) together."""
    if registry.root.name != "models":
        raise SystemExit(
            "--registry must be a folder named 'models' (TRIAGE_DATA_DIR/models) for the http phase"
        )
    port = free_port()
    env = {
        **os.environ,
        "TRIAGE_DATA_DIR": str(registry.root.parent),
        "CLASSIFIER_TOKEN": TOKEN,
        "PYTHONPATH": str(ROOT),
    }
    command = [
        sys.executable,
        "-m",
        "classifier.server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        args.device,
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--poll-interval",
        "0",
        "--log-level",
        "WARNING",
        "--queue-size",
        str(max(2048, args.concurrency * 4)),
    ]
    if args.max_batch_tokens:
        command += ["--max-batch-tokens", str(args.max_batch_tokens)]
    if args.cpu_threads:
        command += ["--cpu-threads", str(args.cpu_threads)]
    if args.compile:
        command += ["--compile"]
    if args.bf16:
        command += ["--bf16"]
    print(f"http: starting triage serve on port {port} ...", file=sys.stderr)
    server = await asyncio.create_subprocess_exec(*command, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
    try:
        async with aiohttp.ClientSession(
            connector=connector, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as http:
            for _ in range(1200):
                if server.returncode is not None:
                    raise SystemExit(f"the server exited with {server.returncode}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/readyz") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.1)

            async def call(text: str) -> Any:
                async with http.post(f"{url}/v1/classify", json={"texts": [text]}) as r:
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
                    return await r.json()

            def cpu_clock() -> float:
                return time.process_time() + process_cpu_s(server.pid)

            yield call, cpu_clock
    finally:
        if server.returncode is None:
            server.terminate()
            await asyncio.wait_for(server.wait(), 30)


def report(result: dict[str, Any]) -> str:
    phases = result["phases"]
    lines = [
        f"device {result['device']} ({result['device_name'] or '?'}), {result['cpus']} CPUs, "
        f"{result['torch_threads']} torch threads; {result['concurrency']} concurrent clients, "
        f"{result['duration_s']:g}s per phase in {result['rounds']} turns; message words: median "
        f"{result['message_words']['median']:.0f}, p90 {result['message_words']['p90']:.0f}",
        "",
        f"{'phase':<12}{'msg/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'msg/CPU-s':>11}{'errors':>8}",
    ]
    for name, p in phases.items():
        lines.append(
            f"{name:<12}{p['messages_per_s']:>10.1f}{p['p50_ms']:>10.1f}{p['p99_ms']:>10.1f}"
            f"{p['messages_per_cpu_s']:>11.1f}{p['errors']:>8}"
        )
    base = phases.get("baseline")
    if base and base["messages_per_s"] > 0:
        lines.append("")
        for name in PHASES[1:]:
            if name in phases:
                p = phases[name]
                lines.append(
                    f"{name} vs baseline: {p['messages_per_s'] / base['messages_per_s']:.2f}x throughput, "
                    f"p99 {p['p99_ms'] / base['p99_ms']:.2f}x, "
                    f"{p['messages_per_cpu_s'] / max(base['messages_per_cpu_s'], 1e-9):.2f}x msg/CPU-s"
                )
    accuracy = result.get("heldout_accuracy")
    if accuracy:
        lines.append("")
        lines.append(f"held-out accuracy ({accuracy['rows']} rows), points lost against torch fp32:")
        for name, heads in accuracy["accuracy"].items():
            lost = accuracy["points_lost_vs_fp32"][name]
            lines.append(
                f"  {name:<11}" + ", ".join(f"{h} {a:.4f} ({lost[h]:+.2f})" for h, a in heads.items())
            )
    if result.get("onnx"):
        lines.append(f"ONNX files: {result['onnx']['reason']} ({result['onnx']['seconds']:.0f} s to make)")
    if result["model_only_sequences_per_s"]:
        lines.append(
            f"model only (pre-tokenized batches): {result['model_only_sequences_per_s']:.0f} sequences/s"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="Hugging Face base model folder [packaged MiniLM]")
    parser.add_argument("--registry", default=None, help="Use this registry's active version instead")
    parser.add_argument("--duration", type=float, default=30.0, help="Measured seconds per phase [30]")
    parser.add_argument("--rounds", type=int, default=3, help="Phases take turns this many times [3]")
    parser.add_argument("--warmup", type=float, default=2.0, help="Unmeasured seconds before each turn [2]")
    parser.add_argument("--concurrency", type=int, default=64, help="Concurrent clients [64]")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto [cpu]")
    parser.add_argument("--cpu-threads", type=int, default=None, help="Torch threads [torch's default]")
    parser.add_argument("--compile", action="store_true", help="torch.compile in the engine and server")
    parser.add_argument("--bf16", action="store_true", help="bf16 in the engine and server (default on CUDA)")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="[engine default for the device]")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--max-length", type=int, default=128, help="Max length of the built model [128, as `triage train`]"
    )
    parser.add_argument("--phases", default=",".join(PHASES), help="Comma-separated subset to run")
    parser.add_argument(
        "--banking77", default=None, help="BANKING77 CSV: benchmark a model trained on it (linear probe)"
    )
    parser.add_argument("--model-only", action="store_true", help="Also measure forward passes alone")
    parser.add_argument(
        "--model-only-batch", type=int, default=None, help="Rows per batch [256 CUDA, 32 CPU]"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="Write the results here as JSON")
    args = parser.parse_args()
    args.model = args.model or str(default_base_model())
    args.phases = set(args.phases.split(","))
    result = asyncio.run(run(args))
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

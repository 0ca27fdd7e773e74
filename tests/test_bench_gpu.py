"""bench/gpu.sh and bench/gpu.py without a GPU: the fast, clear refusal, and the CPU smoke run that checks
every code path of the benchmark before its one run on a GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
GPU_SH = ROOT / "bench" / "gpu.sh"
HAS_GPU = shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()


def run_gpu_sh(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], float, Path]:
    """Run a copy of bench/gpu.sh in an empty checkout, so whatever it installs would land in tmp_path."""
    (tmp_path / "bench").mkdir()
    script = tmp_path / "bench" / "gpu.sh"
    shutil.copy(GPU_SH, script)
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        cwd=tmp_path,
    )
    return result, time.monotonic() - started, tmp_path / "bench" / "out"


def assert_refused(result: subprocess.CompletedProcess[str], seconds: float, out: Path) -> None:
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bench/gpu.sh: no NVIDIA GPU found (")
    assert "nothing was installed" in lines[0]
    assert seconds < 10
    assert not out.exists()  # no venv, no kit, no JSON: it stopped before preparing anything


def test_gpu_sh_refuses_at_once_when_cuda_visible_devices_hides_the_gpus(tmp_path: Path) -> None:
    result, seconds, out = run_gpu_sh(tmp_path, CUDA_VISIBLE_DEVICES="")
    assert_refused(result, seconds, out)
    assert "CUDA_VISIBLE_DEVICES='' hides every GPU" in result.stderr


@pytest.mark.skipif(HAS_GPU, reason="this machine has an NVIDIA GPU")
def test_gpu_sh_refuses_at_once_on_a_machine_without_a_gpu(tmp_path: Path) -> None:
    result, seconds, out = run_gpu_sh(tmp_path)
    assert_refused(result, seconds, out)
    assert "no nvidia-smi and no /dev/nvidia* device" in result.stderr


def run_gpu_py(*args: str, timeout: float = 280) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_gpu_py_refuses_cuda_without_cuda(tmp_path: Path) -> None:
    result = run_gpu_py("--device", "cuda", "--json", str(tmp_path / "gpu.json"), timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("gpu.py: no CUDA GPU visible to PyTorch")
    assert not (tmp_path / "gpu.json").exists()


def forward_flops(model: dict[str, int], tokens: int) -> float:
    """The formula the JSON states, from the model description it records."""
    return 2 * model["layer_params"] * tokens + 4 * model["layers"] * model["hidden"] * tokens**2


def test_gpu_py_smoke_on_the_cpu_writes_every_section(tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    result = run_gpu_py("--smoke", "--device", "cpu", "--json", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(path.read_text(encoding="utf-8"))
    assert "http 4 " in result.stdout and "train bf16" in result.stdout  # the summary printed at the end

    assert report["schema"] == "triage-gpu-bench/1"
    assert report["mode"] == "smoke"
    assert report["device"]["type"] == "cpu"
    assert report["peak_tflops"] == 989.0
    assert "2 * P * L + 4 * n_layers * hidden * L^2" in report["flops_formula"]
    tiny = report["models"]["tiny"]
    assert (tiny["layers"], tiny["hidden"]) == (2, 32)
    assert sorted((s["what"], s["why"]) for s in report["skipped"]) == [
        ("matmul", "CUDA only"),
        ("model_only compile", "CUDA only"),
        ("model_only graph", "CUDA only"),
    ]
    assert set(report["section_s"]) == {"model_only", "http", "training", "model_only_compile"}

    rows = {(r["tokens"], r["batch"], r["variant"]): r for r in report["model_only"]}
    for tokens in (16, 64, 128):
        assert {
            (tokens, "throughput", "fp32"),
            (tokens, "throughput", "bf16"),
            (tokens, "latency", "bf16"),
        } <= set(rows)
        fp32, bf16 = rows[tokens, "throughput", "fp32"], rows[tokens, "throughput", "bf16"]
        assert fp32["sequences_per_s"] > 0 and fp32["vs_fp32"] == 1.0
        assert bf16["vs_fp32"] == pytest.approx(bf16["sequences_per_s"] / fp32["sequences_per_s"], rel=0.01)
        tflops = bf16["sequences_per_s"] * forward_flops(tiny, tokens) / 1e12
        assert bf16["tflops"] == pytest.approx(tflops, rel=0.01)
        assert bf16["share_of_peak"] == pytest.approx(tflops / 989.0, rel=0.01)

    http = report["http"]
    assert http["baseline_per_message"]["messages_per_s"] > 0
    assert set(http["clients"]) == {"2", "4"}
    for phase in (http["baseline_per_message"], *http["clients"].values()):
        assert phase["errors"] == 0 and phase["messages"] > 0
        assert phase["p99_ms"] >= phase["p50_ms"] > 0
        assert phase["share_of_peak"] == pytest.approx(
            phase["messages_per_s"] * http["mean_forward_flops_per_message"] / 1e12 / 989.0, rel=0.01
        )
    assert http["clients"]["4"]["vs_baseline"] > 0

    training = {r["precision"]: r for r in report["training"]}
    assert set(training) == {"fp32", "bf16"}
    assert training["fp32"]["samples_per_s"] > 0 and training["bf16"]["vs_fp32"] > 0
    assert training["bf16"]["autocast_bf16"] is False  # train's bf16 autocast is CUDA-only
    assert training["bf16"]["tflops"] == pytest.approx(
        training["bf16"]["samples_per_s"] * report["training_flops_per_sample"] / 1e12, rel=0.01
    )


def test_gpu_py_skips_what_does_not_fit_the_budget_and_still_writes_the_json(tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    result = run_gpu_py("--smoke", "--device", "cpu", "--budget-s", "0", "--json", str(path), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(path.read_text(encoding="utf-8"))
    budget_skips = [s["what"] for s in report["skipped"] if s["why"].startswith("time budget")]
    assert "http" in budget_skips
    assert any(s.startswith("model_only tiny 16 tokens") for s in budget_skips)
    assert any(s.startswith("training ") for s in budget_skips)
    assert report["model_only"] == [] and report["training"] == [] and "http" not in report


def test_gpu_py_records_a_failing_section_and_goes_on(tmp_path: Path) -> None:
    """The server refuses a negative --max-wait-ms and exits: the run records why and still trains."""
    path = tmp_path / "gpu.json"
    result = run_gpu_py(
        "--smoke",
        "--device",
        "cpu",
        "--sections",
        "http,training",
        "--max-wait-ms",
        "-1",
        "--json",
        str(path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(path.read_text(encoding="utf-8"))
    failures = {s["what"]: s["why"] for s in report["skipped"] if s["why"].startswith("failed:")}
    assert failures == {"http": "failed: SystemExit: the server exited with 2"}
    assert report["http"]["baseline_per_message"]["messages_per_s"] > 0
    assert "clients" not in report["http"]
    assert {r["precision"] for r in report["training"]} == {"fp32", "bf16"}

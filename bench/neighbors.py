"""Why-this-label cost: the search for the nearest training messages of a text's predicted label, per
message on the CPU (the forward pass is shared with classification and not counted here).

Random unit vectors stand in for the pooled embeddings (the cost does not depend on their values):
``--rows`` training rows of ``--dim`` dimensions over ``--labels`` labels, saved and loaded as a version
keeps them (float16 on disk). Measured: ``NeighborIndex.nearest`` per message with the rows spread over
the labels (BANKING77-like) and with all rows under one label (the worst case: one product over every
row), against a baseline measured in the same run: one float16 product over all rows, as the saved
matrix would be used without the per-label float32 blocks built at load time. Target: under 5 ms.

    .venv/bin/python bench/neighbors.py --rows 20000 --dim 384 --labels 77
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classifier.data import Example, write_jsonl
from classifier.neighbors import NeighborIndex, _write, normalized
from classifier.registry import VersionFiles

TARGET_MS = 5.0


def per_message_ms(search: Callable[[np.ndarray], object], queries: np.ndarray, repeat: int) -> float:
    """Median over ``repeat`` rounds of the mean time per query."""
    rounds = []
    for _ in range(repeat):
        started = time.perf_counter()
        for query in queries:
            search(query)
        rounds.append((time.perf_counter() - started) / len(queries) * 1000)
    return statistics.median(rounds)


def build(folder: Path, rows: int, dim: int, labels: int, rng: np.random.Generator) -> NeighborIndex:
    folder.mkdir(parents=True)
    names = np.array([f"label{i % labels}" for i in range(rows)])
    files = VersionFiles(folder)
    write_jsonl(files.dataset, [Example(text=f"training message {i}") for i in range(rows)])
    vectors = normalized(rng.normal(size=(rows, dim))).astype(np.float16)
    _write(files.neighbors, vectors, np.arange(rows), names, "topic")
    started = time.perf_counter()
    index = NeighborIndex.load(files.neighbors, files.dataset)
    print(f"{labels} label(s): loaded in {time.perf_counter() - started:.2f} s", flush=True)
    assert index is not None
    return index


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--labels", type=int, default=77)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="triage-neighbors-"))
    queries = normalized(rng.normal(size=(args.queries, args.dim)))
    spread = build(work / "spread", args.rows, args.dim, args.labels, rng)
    single = build(work / "single", args.rows, args.dim, 1, rng)
    saved = np.load(VersionFiles(work / "single").neighbors)["embeddings"]  # float16, as on disk

    def baseline(query: np.ndarray) -> object:
        similarity = saved @ query.astype(np.float16)
        return np.argpartition(-similarity, args.k)[: args.k]

    predicted = [f"label{i % args.labels}" for i in range(args.queries)]
    cycle = iter(range(10**9))
    results = {
        "baseline: float16 product over all rows": per_message_ms(baseline, queries, args.repeat),
        f"nearest, rows over {args.labels} labels": per_message_ms(
            lambda q: spread.nearest(q, predicted[next(cycle) % args.queries], args.k), queries, args.repeat
        ),
        "nearest, all rows under one label (worst case)": per_message_ms(
            lambda q: single.nearest(q, "label0", args.k), queries, args.repeat
        ),
    }
    base = results["baseline: float16 product over all rows"]
    print(
        f"\n{args.rows} rows x {args.dim} dims, k={args.k}, {args.queries} queries, median of {args.repeat}:"
    )
    for name, ms in results.items():
        verdict = "meets" if ms < TARGET_MS else "MISSES"
        print(f"  {name:<48} {ms:8.3f} ms/message  {base / ms:6.1f}x baseline  ({verdict} {TARGET_MS:g} ms)")


if __name__ == "__main__":
    main()

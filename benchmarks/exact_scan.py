"""One exact top-k pass over an item matrix, four ways, on one thread: which layout and BLAS.

    python benchmarks/exact_scan.py [--items 100000] [--dim 66] [--k 180] [--batches 1,2,3,4,8,16]
        [--json FILE]

For each batch size: FAISS's `knn` (its SIMD scan below 20 queries), a torch product over the
row-major matrix (`queries @ matrix.T`) and over a contiguous column-major copy (`queries @
columns`), and numpy's product over that copy (`app.search.flat` times these last two at load
and scans with the faster), each followed by the same top-k (`app.search.topk.top_candidates`
+ sort). The matrix has the benchmark bundle's structure (low rank plus noise, rows
normalised) but is random: this measures speed, not recall; all four must return the same
items. Medians of `--repeats` calls, best of `--rounds` interleaved
rounds, in ms; JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as in every service worker

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.search.topk import timings_ms, top_candidates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=66, help="a bundle's: 64 + the prior's 2 columns")
    p.add_argument("--k", type=int, default=180, help="50 asked + 100 seen items + margin")
    p.add_argument("--batches", default="1,2,3,4,8,16")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the report here")
    return p.parse_args(argv)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    values, columns = top_candidates(scores, k)
    order = values.sort(dim=1, descending=True).indices
    return columns.gather(1, order)


def scans(
    queries: np.ndarray, matrix: np.ndarray, columns: torch.Tensor, k: int
) -> dict[str, Callable[[], object]]:
    """The four ways to the same top k (item rows per query)."""
    q, rows, numpy_columns = torch.from_numpy(queries), torch.from_numpy(matrix), columns.numpy()
    return {
        "faiss_knn": lambda: faiss.knn(queries, matrix, k, metric=faiss.METRIC_INNER_PRODUCT)[1],
        "row_major": lambda: top_k(q @ rows.T, k),
        "column_major": lambda: top_k(q @ columns, k),
        "column_major_numpy": lambda: top_k(torch.from_numpy(queries @ numpy_columns), k),
    }


def median_ms(call: Callable[[], object], repeats: int) -> float:
    return float(np.median(timings_ms(call, repeats)))


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((args.items, 16), dtype=np.float32) @ rng.standard_normal(
        (16, args.dim), dtype=np.float32
    )
    matrix += 0.3 * rng.standard_normal(matrix.shape, dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    columns = torch.from_numpy(matrix).T.contiguous()
    k = min(args.k, args.items)
    batches = [int(b) for b in args.batches.split(",")]
    best: dict[int, dict[str, float]] = {b: {} for b in batches}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for batch in batches:
                queries = matrix[rng.integers(0, args.items, batch)] + 0.1
                ways = scans(queries, matrix, columns, k)
                answers = [np.sort(np.asarray(call()), axis=1) for call in ways.values()]
                if any(not np.array_equal(a, answers[0]) for a in answers):
                    raise SystemExit(f"the four ways disagree on a batch of {batch}")
                for name, call in ways.items():
                    ms = median_ms(call, args.repeats)
                    best[batch][name] = round(min(best[batch].get(name, ms), ms), 3)
    report = {
        "benchmark": "exact_scan",
        "items": args.items,
        "dim": args.dim,
        "k": k,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "ms": {str(b): best[b] for b in batches},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()

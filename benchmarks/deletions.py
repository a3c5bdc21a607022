"""Items deleted at serving time: per-query exclusions against the overlay's mask, in process.

    python benchmarks/deletions.py [--items 200000] [--dim 64] [--indexes hnsw,flat]
        [--deleted 0,100,1000,10000] [--batches 1,64] [--queries 128] [--k 50] [--seen 20]
        [--filter-share 0.1] [--rounds 3] [--json FILE]

Random unit item vectors (row i = item i), a FAISS index (HNSW, IVF: the service's settings)
or an exact flat scan (not pruned by clusters: random vectors do not cluster, and pruning
would switch itself off), and random deleted rows. Per index, deletion count and batch size,
the per-query latency of `Query.prepare` + `app.retrieval.search` (k results, `--seen` seen
rows per query) both ways: `exclude` (every deleted row joins each query's excluded rows: the
code before the mask) and `mask` (the overlay's `AllowedRows`, the index searching with it as
with a filter's), each overlay built with `app.search.overlay.MASK_MIN_ROWS` forced;
unfiltered, and with a random filter allowing `--filter-share` (the mask combined with it once
per overlay, timed apart as `combine_ms`). The two ways alternate `--rounds` times; each figure
is the best round's mean. What `MASK_MIN_ROWS` is chosen from. JSON on stdout (and `--json`),
progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving_kit.report import log

from app.config import IndexConfig
from app.filters import CompiledFilter
from app.retrieval import Query, search
from app.search import AllowedRows, FaissIndex, FlatIndex, ItemIndex, build_faiss_index, overlay
from app.settings import IndexType

MODES = {"exclude": 1 << 62, "mask": 0}  # MASK_MIN_ROWS forcing each way


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--indexes", default="hnsw,flat")
    p.add_argument("--deleted", default="0,100,1000,10000")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--queries", type=int, default=128, help="queries per measurement")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--seen", type=int, default=20)
    p.add_argument("--filter-share", type=float, default=0.1, help="0: unfiltered only")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.indexes = [x for x in args.indexes.split(",") if x]
    if unknown := set(args.indexes) - {"flat", "hnsw", "ivf"}:
        p.error(f"unknown index kind(s): {sorted(unknown)}")
    args.deleted = [int(x) for x in args.deleted.split(",") if x]
    args.batches = [int(x) for x in args.batches.split(",") if x]
    return args


class RowsOf:
    """The feature encoder's one use here: a history of row numbers is its rows, all of which
    a tower reads (every seen item excluded as a row, as `--seen` says)."""

    def newest_rows(self, history: list[str]) -> tuple[list[int], int]:
        return self.history_rows(history), len(history)

    def history_rows(self, history: list[str]) -> list[int]:
        return [int(item) for item in history]


@dataclass(frozen=True)
class Catalogue:
    """What `Query.prepare` and `search` read of a serving model."""

    index: ItemIndex
    item_ids: tuple[str, ...]
    overlay: overlay.ItemOverlay
    encoder: RowsOf

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


def build_index(kind: IndexType, items: np.ndarray) -> ItemIndex:
    if kind == "flat":
        return FlatIndex(torch.from_numpy(items), screen="off", blas="torch")
    return FaissIndex(build_faiss_index(items, IndexConfig(kind=kind)), items, kind)


def with_overlay(index: ItemIndex, deleted: np.ndarray, min_rows: int) -> Catalogue:
    saved = overlay.MASK_MIN_ROWS
    overlay.MASK_MIN_ROWS = min_rows
    try:
        n = index.n_items
        empty = np.zeros((0, index.dim), np.float32)
        built = overlay.overlay_of([], empty, [], deleted.tolist(), 0, {}, n)
    finally:
        overlay.MASK_MIN_ROWS = saved
    return Catalogue(index, tuple(str(i) for i in range(n)), built, RowsOf())


def compiled(allowed: AllowedRows) -> CompiledFilter:
    return CompiledFilter("bench", allowed, {}, {}, {}, None, frozenset(), {})


def per_query_ms(
    model: Any,
    vectors: np.ndarray,
    histories: list[list[str]],
    k: int,
    batch: int,
    rows_filter: CompiledFilter | None,
) -> float:
    """Mean ms per query of prepare + search, in batches of `batch`."""
    start = time.perf_counter()
    for at in range(0, len(histories), batch):
        queries = [
            Query.prepare(model, {}, h, k, filter=rows_filter) for h in histories[at : at + batch]
        ]
        search(model, vectors[at : at + batch], queries)
    return (time.perf_counter() - start) * 1e3 / len(histories)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    items = rng.standard_normal((args.items, args.dim), dtype=np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    vectors = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    histories = [
        [str(r) for r in rng.choice(args.items, args.seen, replace=False)]
        for _ in range(args.queries)
    ]
    filters: dict[str, CompiledFilter | None] = {"unfiltered": None}
    if args.filter_share > 0:
        mask = rng.random(args.items) < args.filter_share
        filters[f"filter {args.filter_share:g}"] = compiled(AllowedRows(mask))
    out: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "json"}}
    for kind in args.indexes:
        faiss.omp_set_num_threads(2)
        start = time.perf_counter()
        index = build_index(kind, items)
        faiss.omp_set_num_threads(1)
        log(f"{kind}: built in {time.perf_counter() - start:.1f} s")
        for count in args.deleted:
            deleted = rng.choice(args.items, count, replace=False)
            models = {mode: with_overlay(index, deleted, rows) for mode, rows in MODES.items()}
            for name, rows_filter in filters.items():
                row: dict[str, Any] = {}
                if rows_filter is not None and models["mask"].overlay.allowed is not None:
                    start = time.perf_counter()
                    models["mask"].overlay.allowed_with(rows_filter.allowed)
                    row["combine_ms"] = round((time.perf_counter() - start) * 1e3, 3)
                for batch in args.batches:
                    best = {mode: float("inf") for mode in MODES}
                    for _ in range(args.rounds):
                        for mode, model in models.items():
                            ms = per_query_ms(model, vectors, histories, args.k, batch, rows_filter)
                            best[mode] = min(best[mode], ms)
                    row[f"batch {batch}"] = {mode: round(ms, 4) for mode, ms in best.items()}
                out.setdefault(kind, {}).setdefault(name, {})[str(count)] = row
                log(f"{kind} {name} deleted {count}: {json.dumps(row)}")
    text = json.dumps(out, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

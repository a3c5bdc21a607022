"""Filtered recall at every selectivity: recall@K against exact filtered search, and latency,
in process and over HTTP, beside the unfiltered figures of the same run.

    python benchmarks/filtered_search.py [--items 1000000] [--indexes flat,hnsw]
        [--shares 0.5,0.1,0.01,0.001] [--queries 300] [--k 50] [--no-http] [--workers 2]
        [--duration 10] [--connections 16] [--cache-dir /tmp/tower-recall-bench]
        [--json benchmarks/results/filtered_search.json]

The bundle is trained by the real trainer on the synthetic source (`harness/bundles.py`,
cached under `--cache-dir`); it carries `item_attributes.npz`, from which the filters are
made: a price window around the median holding each share of the catalogue (`--shares`;
the share actually allowed is reported), one category and one tag (`include`).

In process (one thread, the service's settings, `app.retrieval.search` on one query at a
time, seen items excluded, for real users' vectors): per filter and index, p50/p99 latency,
recall@K of the index's own answer (`index`: before the exact fill) and of the answer the
service returns (`served`), against an exact filtered top K computed apart (numpy over the
embeddings); and each search path forced at every share (HNSW: the selector, the filter's
own index or the exact scan; flat: clusters with the selector, or the rows scanned as the
service scans them, `scanned`: gathered up to GATHER_MAX_SHARE or kept, else FAISS's selector
scan for a lone query), what
the thresholds between them (`app.search.faiss_index.ANN_MIN_SHARE`,
`app.search.faiss_index.OWN_INDEX_MAX_SHARE`, `app.search.item_index.GATHER_MAX_SHARE`) are
chosen from. Each filter is measured warm: searched FILTER_INDEX_AFTER times first and, where
that builds its own index (`app.search.filter_index`), after the build (`own_index_s`: the
seconds from its first search to a ready index; `own_build_s` for the forced path, 0 where the
filter's index was built already).

Over HTTP (`python -m app`, `--workers` workers, Redis with every user published, wrk or the
Python generator from `serving_kit.load`): requests/s and p99 per filter, and their ratio to
the unfiltered run, after `--warmup` seconds of the same load (enough for a filter's own
index to be built in each worker: `own_indexes` counts those the service has logged). JSON on
stdout (and `--json`), progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving_kit import inprocess, load
from serving_kit.report import log, machine
from serving_kit.service_run import LoadRuns

from app.filters import compile_filter
from app.http.schemas import RecallFilter
from app.model import ServingModel
from app.retrieval import Query, search
from app.search import AllowedRows, FaissIndex, allowed, faiss_index, flat
from harness import procs
from harness.bundles import Recipe, ensure_bundle
from models.bundle import read_latest
from models.online_store import user_records
from models.sources import load_dataset

Filter = tuple[str, dict[str, Any] | None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--indexes", default="flat,hnsw")
    p.add_argument("--shares", default="0.5,0.1,0.01,0.001")
    p.add_argument("--queries", type=int, default=300, help="users measured in process")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-http", action="store_true", help="the in-process part only")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/tower-recall-bench"))
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="a MODEL_DIR already holding the recipe's bundle (else built under --cache-dir)",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.indexes = [x for x in args.indexes.split(",") if x]
    args.shares = [float(x) for x in args.shares.split(",") if x]
    return args


def make_filters(model: ServingModel, shares: list[float]) -> list[Filter]:
    """Unfiltered, a price window per share, one category, one tag."""
    attributes = model.item_attributes
    if attributes is None:
        raise SystemExit("the bundle has no item_attributes.npz: re-export it")
    prices = attributes.columns["price"].numbers
    out: list[Filter] = [("unfiltered", None)]
    for share in shares:
        low, high = np.nanquantile(prices, [0.5 - share / 2, 0.5 + share / 2])
        window = {"gte": float(low), "lt": float(high) if high > low else float(low) + 1e-9}
        out.append((f"price {share:g}", {"range": {"price": window}}))
    for name in ("category", "tags"):
        column = attributes.columns[name]
        out.append((f"{name} {column.dictionary[0]}", {"include": {name: [column.dictionary[0]]}}))
    return out


def exact_reference(
    embeddings: np.ndarray, vectors: np.ndarray, masks: Sequence[np.ndarray | None], k: int
) -> list[set[int]]:
    """Exact top k rows per query among its allowed rows (seen ones already removed)."""
    out = []
    for vector, mask in zip(vectors, masks, strict=True):
        scores = embeddings @ vector
        if mask is not None:
            scores = np.where(mask, scores, -np.inf)
        top = np.argpartition(-scores, k)[:k]
        out.append({int(r) for r in top if scores[r] > -np.inf})
    return out


def _pcts(ms: list[float]) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(ms, q)), 3) for q in (50, 99)}


def warm(
    model: ServingModel, allowed: AllowedRows | None, run: Callable[[], object]
) -> float | None:
    """`run` (a search with the filter of `allowed`) as often as it takes to build the
    filter's own index, and wait for the build: the seconds from the first search to a ready
    index (None: it gets none). An exact index gets none: `run` once, as its first search
    gathers the filter's kept rows (else the first timed search pays for that)."""
    if allowed is None:
        return None
    if not isinstance(model.index, FaissIndex):
        run()
        return None
    own = model.index.filter_indexes
    own.pause = 0.0  # filters measured one after another: no pause between their builds
    start = time.perf_counter()
    for _ in range(own.after):
        run()
    own.wait(300)
    return round(time.perf_counter() - start, 2) if own.ready(allowed) else None


def measure_inprocess(
    model: ServingModel,
    users: list[tuple[dict[str, Any], list[str]]],
    filters: list[Filter],
    k: int,
) -> dict[str, Any]:
    """Per filter: allowed share, latency and recall@k (index alone, served)."""
    features = [f for f, _ in users]
    vectors = model.encode(features, [h for _, h in users])
    embeddings = np.asarray(model.index.matrix.numpy())
    out: dict[str, Any] = {}
    for name, spec in filters:
        compiled = None if spec is None else compile_filter(model, RecallFilter(**spec), ("b",))
        queries = [Query.prepare(model, f, h, k, filter=compiled) for f, h in users]
        masks = []
        for query in queries:
            mask = (
                np.ones(model.n_items, bool) if compiled is None else compiled.allowed.mask.copy()
            )
            mask[list(query.exclude)] = False
            masks.append(mask)
        reference = exact_reference(embeddings, vectors, masks, k)
        first = partial(search, model, vectors[:1], [queries[0]])
        own_index_s = warm(model, queries[0].allowed, first)
        latencies, served, own = [], [], []
        for i, query in enumerate(queries):
            start = time.perf_counter()
            (result,) = search(model, vectors[i : i + 1], [query])
            latencies.append((time.perf_counter() - start) * 1e3)
            rows = {model.encoder.item_index[item] for item, _ in result}
            served.append(len(rows & reference[i]) / max(len(reference[i]), 1))
            fetch = k + len(query.exclude)
            _, found = model.index.search(vectors[i : i + 1], fetch, query.allowed)
            found_rows = [int(r) for r in found[0] if r >= 0 and r not in query.exclude][:k]
            own.append(len(set(found_rows) & reference[i]) / max(len(reference[i]), 1))
        out[name] = {
            "allowed_share": 1.0 if compiled is None else round(compiled.allowed.share, 5),
            "latency_ms": _pcts(latencies),
            "recall_at_k_served": round(float(np.mean(served)), 4),
            "recall_at_k_index": round(float(np.mean(own)), 4),
            "own_index_s": own_index_s,
        }
        log(f"  {model.index.kind} {name}: {json.dumps(out[name])}")
    return out


# Per index kind, each filtered search path and the module constants that force it at every
# share (what `ANN_MIN_SHARE`, `PRUNE_MIN_SHARE` and `MAX_GATHERED_ROWS` are chosen from).
Forced = dict[tuple[Any, str], float]
PATHS: dict[str, dict[str, Forced]] = {
    "hnsw": {
        "selector": {
            (faiss_index, "ANN_MIN_SHARE"): 0.0,
            (faiss_index, "OWN_INDEX_MAX_SHARE"): -1.0,
            (allowed, "MAX_GATHERED_ROWS"): 0,
        },
        "own": {
            (faiss_index, "ANN_MIN_SHARE"): 0.0,
            (faiss_index, "OWN_INDEX_MAX_SHARE"): 2.0,
            (allowed, "MAX_GATHERED_ROWS"): 0,
        },
        "exact": {(faiss_index, "ANN_MIN_SHARE"): 2.0},
    },
    "flat": {
        "pruned": {(flat, "PRUNE_MIN_SHARE"): -1.0, (allowed, "MAX_GATHERED_ROWS"): 0},
        "scanned": {(flat, "PRUNE_MIN_SHARE"): 2.0},
    },
}


def index_paths(
    model: ServingModel,
    users: list[tuple[dict[str, Any], list[str]]],
    filters: list[Filter],
    k: int,
) -> dict[str, Any]:
    """Each filtered search path of the index, forced at every share: latency (a filter's
    kept rows are gathered by its first query, which is not timed)."""
    vectors = model.encode([f for f, _ in users], [h for _, h in users])
    out: dict[str, Any] = {}
    for label, spec in filters:
        if spec is None:
            continue
        row: dict[str, Any] = {}
        for path, forced in PATHS[model.index.kind].items():
            if path == "own" and isinstance(model.index, FaissIndex):  # FILTER_INDEX_ROWS too
                forced = {**forced, (model.index.filter_indexes, "max_rows"): model.n_items}
            saved = {key: getattr(*key) for key in forced}
            try:
                for (module, name), value in forced.items():
                    setattr(module, name, value)
                rows = compile_filter(model, RecallFilter(**spec), ("b",)).allowed
                row["allowed_share"] = round(rows.share, 5)
                search_it = partial(model.index.search, vectors[:1], k, rows)
                if path == "own":  # built first (0 s: the filter's, measured above, serves)
                    row["own_build_s"] = warm(model, rows, search_it)
                else:
                    search_it()
                ms = []
                for i in range(len(vectors)):
                    start = time.perf_counter()
                    model.index.search(vectors[i : i + 1], k, rows)
                    ms.append((time.perf_counter() - start) * 1e3)
                row[path] = _pcts(ms)
            finally:
                for (module, name), value in saved.items():
                    setattr(module, name, value)
        out[label] = row
        log(f"  {model.index.kind} paths {label}: {json.dumps(row)}")
    return out


# What a worker logs when a filter's own index is built (`app.search.filter_index`).
OWN_INDEX_LOGGED = "filter index:"


def measure_http(
    args: argparse.Namespace, model_dir: Path, users: int, index: str, filters: list[Filter]
) -> dict[str, Any]:
    """rps and p99 per filter against the real service, beside the unfiltered run."""
    redis = procs.RedisServer().start()
    logs = args.cache_dir / "logs"
    service_log = logs / f"{index}.log"
    service = procs.Service(model_dir, redis.url, index, args.workers, service_log)
    out: dict[str, Any] = {}
    try:
        procs.publish_features(f"synthetic:seed={args.seed},users={users},items={args.items}",
                               redis.url, 100)  # fmt: skip
        service.start()
        out["startup"] = service.wait_ready(1800)
        use_wrk = load.wrk_path() is not None
        runs = LoadRuns(service.worker_pids(), redis.pid, use_wrk, 1)
        for name, spec in filters:
            extra = "" if spec is None else ',"filter":' + json.dumps(spec)
            target = load.Target(service.base_url + "/v1/recall", users, args.k, args.seed, extra)
            runs.run(target, args.connections, args.warmup)
            built = service_log.read_text(errors="replace").count(OWN_INDEX_LOGGED)
            result = runs.run(target, args.connections, args.duration)
            result["own_indexes"] = built  # in all workers, this filter's and earlier ones'

            base = out.get("unfiltered", result)
            result["rps_vs_unfiltered"] = round(result["rps"] / base["rps"], 3)
            result["p99_vs_unfiltered"] = round(result["p99_ms"] / base["p99_ms"], 3)
            out[name] = result
            log(f"  http {index} {name}: {result['rps']} rps, p99 {result['p99_ms']} ms")
    finally:
        service.stop()
        redis.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = Recipe(items=args.items, users=args.users, seed=args.seed, batch_size=8192)
    if args.model_dir is None:
        built = ensure_bundle(recipe, args.cache_dir)
        model_dir, bundle = built.model_dir, built.describe()
    else:
        model_dir, bundle = args.model_dir, {"model_dir": str(args.model_dir)}
        bundle["version"] = read_latest(model_dir)
    log(f"bundle {bundle['version']}; generating the dataset for users' features and histories")
    records = list(user_records(load_dataset(recipe.source), 100))
    rng = np.random.default_rng(args.seed)
    picked = rng.choice(len(records), size=min(args.queries, len(records)), replace=False)
    users = [(records[i][1], records[i][2]) for i in picked]
    out: dict[str, Any] = {"machine": machine(), "bundle": bundle, "k": args.k}
    out["inprocess"], out["http"] = {}, {}
    for index in args.indexes:
        settings = inprocess.service_settings(model_dir, index, "")
        model, load_s, _ = inprocess.load(settings)
        log(f"{index}: loaded in {load_s:.1f} s")
        filters = make_filters(model, args.shares)
        out["filters"] = dict(filters)
        out["inprocess"][index] = measure_inprocess(model, users, filters, args.k)
        if index in PATHS:
            paths = index_paths(model, users[:100], filters, args.k)
            out["inprocess"][f"{index}_paths"] = paths
        del model
        if not args.no_http:
            out["http"][index] = measure_http(args, model_dir, args.users, index, filters)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

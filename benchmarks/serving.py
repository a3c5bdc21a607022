"""Serving throughput and latency of the real recall service, against baselines from the same run.

    python benchmarks/serving.py [--sizes 100000,1000000] [--indexes flat,hnsw] [--workers 1,2]
        [--duration 10] [--connections 16] [--json benchmarks/results/serving.json] [--profile]
        [--tree DIR]   # measure another checkout's app/ and models/ (before/after)

For each catalogue size it builds (or reuses, from `--cache-dir`) a bundle trained by the real
trainer on the synthetic source (`python -m models train --data synthetic:seed=S,users=U,
items=N --split none`; trained, structured item vectors, never random ones), starts its own
`redis-server` on a free port and publishes every user's features and history into it
(`python -m models publish-features`). Then, per index type:

- the in-process floor: the same bundle loaded as `app.model.ServingModel` with the service's
  settings, one thread; p50/p90/p99 of one whole recall (parse, Redis fetch without the L1
  cache, encode, search, JSON) and of each stage, over random published users;
- for HNSW, recall@K of the index against exact search for a sample of real user vectors, at
  the configured efSearch and a sweep of others;

and per worker count, the real service (`python -m app`, env MODEL_DIR, REDIS_URL,
INDEX_TYPE, WORKERS, PORT, OMP_NUM_THREADS=1) as a separate process:

- start-up time to ready (every worker), resident memory per worker (VmRSS, VmHWM, and
  RssAnon/RssFile: file-backed pages can be shared between workers);
- `POST /v1/recall` (k = K, a random published user per request) with `--connections`
  connections for `--duration` seconds after `--warmup`: requests/s, p50/p90/p99/max,
  errors and non-2xx; then one connection (p50: latency without queueing);
- `GET /health/live` on the same server with the same load (and with one connection): the
  bare-endpoint baseline;
- the CPU cores each party used during every run (workers, each worker, Redis, the load
  generator); a 2-worker run whose load landed on one worker (keep-alive connections stay
  where they were accepted) is flagged in `warnings`;
- ratios: recall rps / bare rps, p50 / floor, rps / (min(workers, cores) / floor), and the
  workers' CPU time per request against the floor (the figure least disturbed by other jobs);
- the service's own /metrics (every worker's counts summed, read right after the recall run: its
  warm-up and the run itself): mean stage times, batch size, cache hit rates;
- with `--profile`, one more recall run under `py-spy record` per worker: where time goes.
- first, unless `--no-reference`: the issue's bare FastAPI prototype (one route) on this
  machine, per worker count: its speed against the issue's machine, by which `targets` also
  scales the throughput and latency targets (`on_this_machine`; `serving_kit.reference`).

Load comes from `wrk` (Lua script; `apt-get install -y wrk`) on loopback. Without wrk a
Python asyncio generator runs instead, and the report warns that it may be the bottleneck.
Client, server and Redis share the machine: on a 2-core box the figures are lower bounds
of what a dedicated server would do, and noisy when other jobs run (load averages are in
the report). JSON goes to stdout (and `--json FILE`); progress and a table go to stderr.
The issue's targets (issue 6) covered by the chosen matrix are checked in `targets`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import urllib.error
from pathlib import Path
from typing import Any

# The repository root, for the harness the tests share (and app/ and models/ of this checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving_kit import load, reference, report
from serving_kit.report import log
from serving_kit.service_run import run_service

from harness import procs
from harness.bundles import BuiltBundle, Recipe, ensure_bundle
from harness.cluster import ClusterRedis

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    m = p.add_argument_group("matrix")
    m.add_argument("--sizes", type=int_list, default=[100_000, 1_000_000])
    m.add_argument("--indexes", default="flat,hnsw")
    m.add_argument("--workers", type=int_list, default=[1, 2])
    g = p.add_argument_group("load")
    g.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    g.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    g.add_argument("--single-duration", type=float, default=5.0, help="the 1-connection run")
    g.add_argument("--connections", type=int, default=16)
    g.add_argument(
        "--redis-cluster",
        action="store_true",
        help="a local Redis Cluster (3 primaries + 3 replicas) instead of one redis-server",
    )
    g.add_argument("--k", type=int, default=50)
    g.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    g.add_argument("--wrk-threads", type=int, default=1, help="1 leaves the cores to the server")
    b = p.add_argument_group("bundles (trained by `python -m models train`)")
    b.add_argument("--users", type=int, default=20_000)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--per-user",
        type=int,
        help="synthetic interactions per user (default: the source's 45, histories of 30-60 "
        "items; e.g. 300 fills a 200-item history)",
    )
    b.add_argument("--epochs", type=int, default=1)
    b.add_argument("--batch-size", type=int, default=8192)
    b.add_argument(
        "--field-dim", type=int, help="default: the trainer's (32; the sequential tower 64)"
    )
    b.add_argument("--hidden", default="256")
    b.add_argument("--out-dim", type=int, default=64)
    b.add_argument(
        "--history-length", type=int, help="default: the trainer's (100; the sequential tower 200)"
    )
    b.add_argument("--popularity-prior", type=float, help="default: the trainer's")
    b.add_argument("--train-args", default="", help="more trainer options: '--user-tower ...'")
    b.add_argument("--cache-dir", type=Path, default=RESULTS / "bundles")
    i = p.add_argument_group("in-process measurements")
    i.add_argument("--floor-iterations", type=int, default=2000)
    i.add_argument("--recall-sample", type=int, default=1000, help="users for HNSW recall@K")
    i.add_argument("--ef-sweep", type=int_list, default=[16, 32, 64, 128, 256])
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, help="also write the report here")
    o.add_argument("--logs-dir", type=Path, default=RESULTS / "logs", help="service logs")
    o.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the machine reference (the issue's bare FastAPI prototype, for scaling)",
    )
    o.add_argument("--profile", action="store_true", help="py-spy record each worker under load")
    o.add_argument("--profile-native", action="store_true", help="include C/C++ frames")
    p.add_argument("--startup-timeout", type=float, default=1800.0)
    p.add_argument(
        "--tree",
        type=Path,
        default=ROOT,
        help="source tree whose app/ and models/ are measured (default: this checkout), "
        "e.g. `git worktree add /tmp/before HEAD~1` for a before/after comparison",
    )
    args = p.parse_args(argv)
    for name in ("cache_dir", "json", "logs_dir", "tree"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    args.indexes = [x for x in args.indexes.split(",") if x]
    return args


def save(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Write the report so far to --json (a long run leaves its partial results behind)."""
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


def recipe_of(args: argparse.Namespace, items: int) -> Recipe:
    """The benchmark bundle of `items` items that the options describe."""
    return Recipe(
        items=items,
        users=args.users,
        seed=args.seed,
        per_user=args.per_user,
        epochs=args.epochs,
        batch_size=args.batch_size,
        field_dim=args.field_dim,
        hidden=args.hidden,
        out_dim=args.out_dim,
        history_length=args.history_length,
        popularity_prior=args.popularity_prior,
        train_args=args.train_args,
    )


def measure_size(
    args: argparse.Namespace,
    items: int,
    redis: procs.RedisServer | ClusterRedis,
    use_wrk: bool,
    report_out: dict[str, Any],
) -> None:
    """Measure one catalogue size into `report_out` (`sizes[items]` and rows of `results`)."""
    from serving_kit import inprocess  # imports torch/FAISS: after OMP_NUM_THREADS is set

    recipe = recipe_of(args, items)
    built = ensure_bundle(recipe, args.cache_dir)
    redis.flush()
    settings = inprocess.service_settings(built.model_dir, "flat", redis.url)
    publish_s = procs.publish_features(
        recipe.source, redis.url, settings.history_cap, cluster=args.redis_cluster
    )
    log(f"{items} items: bundle {built.version}, features published in {publish_s:.1f} s")
    out: dict[str, Any] = {
        "bundle": built.describe() | {"publish_s": round(publish_s, 1)},
        "floors": {},
    }
    report_out["sizes"][str(items)] = out
    for index in args.indexes:
        settings = inprocess.service_settings(built.model_dir, index, redis.url)
        bundle, load_s, index_cached = inprocess.load(settings)
        how = "index from the benchmark's cache" if index_cached else "index built"
        log(f"{items} {index}: loaded in-process in {load_s:.1f} s ({how}); measuring the floor")
        floor = inprocess.measure_floor(
            bundle, settings, recipe.users, args.k, args.floor_iterations, args.seed
        )
        floor["inprocess_load_s"] = round(load_s, 1)
        floor["inprocess_index_cached"] = index_cached
        out["floors"][index] = floor
        save(args, report_out)
        if index == "hnsw":
            log(f"{items} hnsw: recall@{args.k} against exact search")
            out["hnsw_recall"] = inprocess.hnsw_recall(
                bundle, settings, recipe.users, args.k, args.recall_sample, args.ef_sweep, args.seed
            )
        del bundle
        gc.collect()
        for workers in args.workers:
            row = measure_service(args, built, redis, index, workers, use_wrk)
            if "error" not in row:
                floor_ms = floor["recall"]["p50_ms"]
                row["floor_p50_ms"] = floor_ms
                row["ratios"] = report.ratios(
                    row["recall"], row["single"], row["bare"], floor_ms, workers
                )
                log(f"{items} {index} w{workers}: {row['recall']['rps']:.0f} rps")
            report_out["results"].append(row)
            save(args, report_out)


def measure_service(
    args: argparse.Namespace,
    built: BuiltBundle,
    redis: procs.RedisServer | ClusterRedis,
    index: str,
    workers: int,
    use_wrk: bool,
) -> dict[str, Any]:
    """One row of `results`: the service's figures, or the error that stopped it."""
    items = built.recipe.items
    row: dict[str, Any] = {"items": items, "index": index, "workers": workers}
    try:
        row |= run_service(args, built, redis.url, redis.pid, index, workers, use_wrk)
    except (RuntimeError, OSError, urllib.error.URLError) as exc:
        log(f"{items} {index} w{workers} failed: {exc}")
        row["error"] = str(exc)[-2000:]
    return row


def finish(args: argparse.Namespace, out: dict[str, Any]) -> int:
    """Complete the report (settings, targets), save and print it; 1 if a row failed."""
    from serving_kit.inprocess import service_settings

    defaults = service_settings(Path("artifacts"), "flat", "")
    out["service_settings"] = {
        "hnsw_m": defaults.hnsw_m,
        "hnsw_ef_search": defaults.hnsw_ef_search,
        "hnsw_ef_construction": defaults.hnsw_ef_construction,
        "cache_ttl_s": defaults.cache_ttl_s,
        "cache_size": defaults.cache_size,
        "torch_threads": defaults.torch_threads,
    }
    out["targets"] = report.targets_of(out)
    out["machine"]["loadavg_after"] = report.loadavg()
    app_module = sys.modules.get("app")
    out["code"]["app_imported_from"] = getattr(app_module, "__file__", None)
    out["complete"] = True
    save(args, out)
    print(json.dumps(out, indent=2))
    print(report.summary(out), file=sys.stderr)
    return 1 if any("error" in r for r in out["results"]) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # One OpenMP thread per process, as the service runs; set before torch/FAISS are imported.
    os.environ["OMP_NUM_THREADS"] = "1"
    # The measured tree's packages first, here and in every child (`python -m app` runs in it,
    # since `-m` puts the working directory first on the path).
    sys.path.insert(0, str(args.tree))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(args.tree), os.environ.get("PYTHONPATH")])
    )
    os.chdir(args.tree)
    use_wrk = args.generator == "wrk" or (args.generator == "auto" and load.wrk_path() is not None)
    if use_wrk and load.wrk_path() is None:
        print("error: --generator wrk, but wrk is not installed", file=sys.stderr)
        return 2
    out = report.head(args, argv, use_wrk)
    if not args.no_reference:
        log("machine reference: the issue's bare FastAPI prototype")
        out["machine_reference"] = [
            reference.measure(
                w, args.connections, args.duration, use_wrk=use_wrk, wrk_threads=args.wrk_threads
            )
            for w in args.workers
        ]
    if args.redis_cluster:  # the services (and the in-process settings) read the env
        os.environ["REDIS_CLUSTER"] = "true"
    redis = (ClusterRedis() if args.redis_cluster else procs.RedisServer()).start()
    out["redis"] = "cluster (3 primaries + 3 replicas)" if args.redis_cluster else "standalone"
    try:
        for items in args.sizes:
            measure_size(args, items, redis, use_wrk, out)
    finally:
        redis.stop()
    return finish(args, out)


if __name__ == "__main__":
    sys.exit(main())

"""Serving throughput and latency of the real recall service, against baselines from the same run.

    python benchmarks/serving.py [--sizes 100000,1000000] [--indexes flat,hnsw] [--workers 1,2]
        [--duration 10] [--connections 16] [--json benchmarks/results/serving.json] [--profile]
        [--tree DIR]   # measure another checkout's app/ and models/ (before/after)

For each catalogue size it builds (or reuses, from `--cache-dir`) a bundle trained by the real
trainer on the synthetic source (`python -m models train --data synthetic:seed=S,users=U,
items=N --split none`; trained, structured item vectors, never random ones), starts its own
`redis-server` on a free port and publishes every user's features and history into it
(`python -m models publish-features`). Then, per index type:

- the in-process floor: the same bundle loaded by `app.bundle_loader` with the service's
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
- the service's own /metrics (one worker's view, read right after the recall run: its
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
import resource
import sys
import time
import urllib.error
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serving_kit import load, procs, profile, reference, report
from serving_kit.bundles import BuiltBundle, Recipe, ensure_bundle

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


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
    b.add_argument("--epochs", type=int, default=1)
    b.add_argument("--batch-size", type=int, default=8192)
    b.add_argument("--field-dim", type=int, default=32)
    b.add_argument("--hidden", default="256")
    b.add_argument("--out-dim", type=int, default=64)
    b.add_argument("--history-length", type=int, default=100)
    b.add_argument("--popularity-prior", type=float, help="default: the trainer's")
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


def service_metrics(base_url: str) -> dict[str, Any]:
    """Mean stage times (per batch), mean micro-batch size and cache hit rates from /metrics
    (cumulative since start, one worker's view; absent series: None)."""
    import urllib.request

    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        sums[name] = float(value)
    out: dict[str, Any] = {"stage_mean_ms": {}}
    for name, value in sums.items():
        if name.startswith("tower_recall_stage_duration_seconds_sum{"):
            stage = name.split('stage="', 1)[1].split('"', 1)[0]
            count = sums.get(name.replace("_sum{", "_count{"), 0.0)
            out["stage_mean_ms"][stage] = round(value / count * 1000, 4) if count else None
    hits = sums.get("tower_recall_cache_hits_total", 0.0)
    misses = sums.get("tower_recall_cache_misses_total", 0.0)
    out["cache_hit_rate"] = round(hits / (hits + misses), 4) if hits + misses else None
    batches = sums.get("tower_recall_batch_size_count", 0.0)
    recalls = sums.get("tower_recall_batch_size_sum", 0.0)
    out["mean_batch_size"] = round(recalls / batches, 2) if batches else None
    v_hits = sums.get('tower_recall_vector_cache_total{result="hit"}', 0.0)
    v_misses = sums.get('tower_recall_vector_cache_total{result="miss"}', 0.0)
    out["vector_cache_hit_rate"] = (
        round(v_hits / (v_hits + v_misses), 4) if v_hits + v_misses else None
    )
    return out


def sanity_check(base_url: str, k: int) -> dict[str, Any]:
    """One recall for a published user must answer k items from Redis features."""
    answer = procs.http_json(base_url + "/v1/recall", {"user_id": "u0", "k": k})
    if len(answer["items"]) != k or answer["feature_source"] != "redis":
        raise RuntimeError(f"unexpected recall answer: {json.dumps(answer)[:300]}")
    return {"model_version": answer["model_version"], "items": len(answer["items"])}


def run_service(
    args: argparse.Namespace,
    built: BuiltBundle,
    redis_url: str,
    redis_pid: int,
    index: str,
    workers: int,
    use_wrk: bool,
) -> dict[str, Any]:
    name = f"{built.recipe.items}-{index}-w{workers}"
    service = procs.Service(
        built.model_dir, redis_url, index, workers, args.logs_dir / f"{name}.log"
    ).start()
    out: dict[str, Any] = {}
    try:
        log(f"{name}: starting the service")
        out["startup"] = service.wait_ready(args.startup_timeout)
        out["startup"]["index_from_cache"] = service.index_from_cache()
        out["memory_ready"] = service.memory()
        out["check"] = sanity_check(service.base_url, args.k)
        users = built.recipe.users
        recall = load.Target(service.base_url + "/v1/recall", users, args.k, args.seed)
        bare = load.Target(service.base_url + "/health/live")
        c = args.connections

        workers_pids = service.worker_pids()

        def run(target: load.Target, connections: int, seconds: float) -> dict[str, Any]:
            """One load run, with the CPU each party used during it (cores = cpu_s / wall).
            Keep-alive connections stay with the worker that accepted them, so
            `worker_cores` shows whether the load was spread over the workers."""
            pids = [*workers_pids, redis_pid]
            before = [procs.cpu_seconds(pid) for pid in pids]
            # wrk is a child process; the Python generator runs in this one.
            who = resource.RUSAGE_CHILDREN if use_wrk else resource.RUSAGE_SELF
            start = resource.getrusage(who)
            result = load.run_load(
                target, connections, seconds, use_wrk=use_wrk, wrk_threads=args.wrk_threads
            ).to_json()
            used = [procs.cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
            end = resource.getrusage(who)
            wall = result["duration_s"] or 1.0
            cores = {"workers": sum(used[:-1]) / wall, "redis": used[-1] / wall}
            generator_s = (end.ru_utime + end.ru_stime) - (start.ru_utime + start.ru_stime)
            cores["load_generator"] = generator_s / wall
            result["cores_used"] = {k: round(v, 2) for k, v in cores.items()}
            result["worker_cores"] = [round(u / wall, 2) for u in used[:-1]]
            return result

        out["loadavg_before"] = report.loadavg()
        log(f"{name}: ready in {out['startup']['ready_s']} s; recall load")
        if args.warmup > 0:
            run(recall, c, args.warmup)
        out["recall"] = run(recall, c, args.duration)
        # Read before the one-connection run, whose batches of one would otherwise dilute the
        # batch size and stage means of whichever worker served it.
        out["service_metrics"] = service_metrics(service.base_url)
        shares = out["recall"]["worker_cores"]
        if len(shares) > 1 and sum(shares) and max(shares) / sum(shares) > 0.75:
            out["warnings"] = [
                f"recall load landed mostly on one worker (cores {shares}): keep-alive "
                "connections stay with the worker that accepted them, so rps understates "
                "what the workers can do together"
            ]
        out["single"] = run(recall, 1, args.single_duration)
        log(f"{name}: bare endpoint")
        if args.warmup > 0:
            run(bare, c, min(args.warmup, 2.0))
        out["bare"] = run(bare, c, args.duration)
        out["bare_single"] = run(bare, 1, args.single_duration)
        out["memory_after_load"] = service.memory()
        out["loadavg_after"] = report.loadavg()
        if args.profile or args.profile_native:
            log(f"{name}: profiling under load")
            running = profile.start_recording(
                service.worker_pids(),
                args.duration,
                args.logs_dir / f"profile-{name}",
                args.profile_native,
            )
            time.sleep(0.5)  # py-spy attaches before the load starts
            out["profiled_recall"] = run(recall, c, args.duration)
            out["profile"] = profile.finish_recording(running, args.duration)
    finally:
        service.stop()
    return out


def save(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Write the report so far to --json (a long run leaves its partial results behind)."""
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


def measure_size(
    args: argparse.Namespace,
    items: int,
    redis: procs.RedisServer | procs.ClusterRedis,
    use_wrk: bool,
    report_out: dict[str, Any],
) -> None:
    """Measure one catalogue size into `report_out` (`sizes[items]` and rows of `results`)."""
    from serving_kit import inprocess  # imports torch/FAISS: after OMP_NUM_THREADS is set

    recipe = Recipe(
        items=items,
        users=args.users,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        field_dim=args.field_dim,
        hidden=args.hidden,
        out_dim=args.out_dim,
        history_length=args.history_length,
        popularity_prior=args.popularity_prior,
    )
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
        floor_ms = floor["recall"]["p50_ms"]
        for workers in args.workers:
            row: dict[str, Any] = {"items": items, "index": index, "workers": workers}
            try:
                row |= run_service(args, built, redis.url, redis.pid, index, workers, use_wrk)
            except (RuntimeError, OSError, urllib.error.URLError) as exc:
                log(f"{items} {index} w{workers} failed: {exc}")
                row["error"] = str(exc)[-2000:]
            else:
                row["floor_p50_ms"] = floor_ms
                row["ratios"] = report.ratios(
                    row["recall"], row["single"], row["bare"], floor_ms, workers
                )
                log(f"{items} {index} w{workers}: {row['recall']['rps']:.0f} rps")
            report_out["results"].append(row)
            save(args, report_out)


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
    warning = None if use_wrk else load.FALLBACK_WARNING
    if warning:
        log(f"WARNING: {warning}")
    out: dict[str, Any] = {
        "benchmark": "serving",
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": report.machine(),
        "code": report.code_state(args.tree),
        "load_generator": {
            "tool": "wrk" if use_wrk else "python-asyncio",
            "version": load.wrk_version() if use_wrk else None,
            "threads": args.wrk_threads if use_wrk else 1,
            "connections": args.connections,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "single_connection_duration_s": args.single_duration,
            "k": args.k,
            "warning": warning,
        },
        "complete": False,
        "sizes": {},
        "results": [],
    }
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
    redis = (procs.ClusterRedis() if args.redis_cluster else procs.RedisServer()).start()
    out["redis"] = "cluster (3 primaries + 3 replicas)" if args.redis_cluster else "standalone"
    try:
        for items in args.sizes:
            measure_size(args, items, redis, use_wrk, out)
    finally:
        redis.stop()
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
    recall_at = {k: v["hnsw_recall"] for k, v in out["sizes"].items() if "hnsw_recall" in v}
    speed = {r["workers"]: r["speed"] for r in out.get("machine_reference", []) if r["speed"]}
    out["targets"] = report.targets(out["results"], recall_at, speed)
    out["machine"]["loadavg_after"] = report.loadavg()
    app_module = sys.modules.get("app")
    out["code"]["app_imported_from"] = getattr(app_module, "__file__", None)
    out["complete"] = True
    save(args, out)
    print(json.dumps(out, indent=2))
    print(report.table(out["results"]), file=sys.stderr)
    failed = [t["target"] for t in out["targets"] if t["ok"] is False]
    print(f"targets missed: {len(failed)} of {len(out['targets'])}", file=sys.stderr)
    for ref in out.get("machine_reference", []):
        print(
            f"machine speed ({ref['workers']} worker(s)): {ref['speed']} of the issue's "
            f"(prototype bare GET {ref['rps']:.0f} rps here, {ref['issue_rps']} there)",
            file=sys.stderr,
        )
    scaled = [t for t in out["targets"] if "on_this_machine" in t]
    missed = [t["target"] for t in scaled if t["on_this_machine"]["ok"] is False]
    if scaled:
        print(f"speed-scaled targets missed: {len(missed)} of {len(scaled)}", file=sys.stderr)
    return 1 if any("error" in r for r in out["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())

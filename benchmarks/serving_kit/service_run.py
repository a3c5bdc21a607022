"""One configuration of `serving.py` against the real service (`python -m app` as a process):
start-up, a sanity recall, recall and bare-endpoint load runs with the CPU each party used
during each, the service's own /metrics, resident memory and, optionally, a profile under load.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import dataclass
from typing import Any

from harness import procs
from harness.bundles import BuiltBundle
from serving_kit import load, profile, report
from serving_kit.report import log


def service_metrics(base_url: str) -> dict[str, Any]:
    """Mean stage times (per batch), mean micro-batch size and cache hit rates from /metrics
    (cumulative since start, every worker summed; absent series: None)."""
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


@dataclass(frozen=True)
class LoadRuns:
    """Load runs against one service, each with the CPU each party used during it (cores =
    cpu_s / wall). Keep-alive connections stay with the worker that accepted them, so
    `worker_cores` shows whether the load was spread over the workers."""

    worker_pids: list[int]
    redis_pid: int
    use_wrk: bool
    wrk_threads: int

    def run(self, target: load.Target, connections: int, seconds: float) -> dict[str, Any]:
        pids = [*self.worker_pids, self.redis_pid]
        before = [procs.cpu_seconds(pid) for pid in pids]
        # wrk is a child process; the Python generator runs in this one.
        who = resource.RUSAGE_CHILDREN if self.use_wrk else resource.RUSAGE_SELF
        start = resource.getrusage(who)
        result = load.run_load(
            target, connections, seconds, use_wrk=self.use_wrk, wrk_threads=self.wrk_threads
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


def run_service(
    args: argparse.Namespace,
    built: BuiltBundle,
    redis_url: str,
    redis_pid: int,
    index: str,
    workers: int,
    use_wrk: bool,
) -> dict[str, Any]:
    """The service with `workers` workers over `index`, measured; always stopped."""
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
        runs = LoadRuns(service.worker_pids(), redis_pid, use_wrk, args.wrk_threads)
        recall = load.Target(service.base_url + "/v1/recall", built.recipe.users, args.k, args.seed)
        measure_load(args, service, runs, recall, name, out)
        if args.profile or args.profile_native:
            log(f"{name}: profiling under load")
            running = profile.start_recording(
                service.worker_pids(),
                args.duration,
                args.logs_dir / f"profile-{name}",
                args.profile_native,
            )
            time.sleep(0.5)  # py-spy attaches before the load starts
            out["profiled_recall"] = runs.run(recall, args.connections, args.duration)
            out["profile"] = profile.finish_recording(running, args.duration)
    finally:
        service.stop()
    return out


def measure_load(
    args: argparse.Namespace,
    service: procs.Service,
    runs: LoadRuns,
    recall: load.Target,
    name: str,
    out: dict[str, Any],
) -> None:
    """Recall under load and with one connection, then the bare endpoint alike, into `out`."""
    c = args.connections
    bare = load.Target(service.base_url + "/health/live")
    out["loadavg_before"] = report.loadavg()
    log(f"{name}: ready in {out['startup']['ready_s']} s; recall load")
    if args.warmup > 0:
        runs.run(recall, c, args.warmup)
    out["recall"] = runs.run(recall, c, args.duration)
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
    out["single"] = runs.run(recall, 1, args.single_duration)
    log(f"{name}: bare endpoint")
    if args.warmup > 0:
        runs.run(bare, c, min(args.warmup, 2.0))
    out["bare"] = runs.run(bare, c, args.duration)
    out["bare_single"] = runs.run(bare, 1, args.single_duration)
    out["memory_after_load"] = service.memory()
    out["loadavg_after"] = report.loadavg()

"""The report of `serving.py`: its head (command, machine, code, load generator), ratios, the
issue's targets, and what people read on stderr: progress lines, the table, the summary."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from serving_kit import load

NOISE_NOTE = (
    "shared machine: other jobs may run on the same cores during the benchmark; compare "
    "figures only with a baseline measured in the same run, and read the load averages"
)


def log(message: str) -> None:
    """A progress line on stderr, with the time."""
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return 0.0


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for package in ("torch", "faiss-cpu", "fastapi", "uvicorn", "pydantic", "redis", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        # The widest vector units torch uses here (AVX2, AVX512): the tower's cost follows it.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gb": _mem_total_gb(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "packages": versions,
        "loadavg_before": loadavg(),
        "note": NOISE_NOTE,
    }


def code_state(tree: Path) -> dict[str, Any]:
    """Which service code was measured: the tree, its commit, uncommitted app/ and models/."""

    def git(*args: str) -> str:
        proc = subprocess.run(
            ["git", "-C", str(tree), *args], capture_output=True, text=True, check=False
        )
        return proc.stdout.rstrip("\n") if proc.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "app", "models").splitlines()
    return {
        "tree": str(tree),
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "uncommitted_service_changes": changed,
    }


def ratios(
    recall: dict[str, Any],
    single: dict[str, Any],
    bare: dict[str, Any],
    floor_ms: float,
    workers: int,
) -> dict[str, float | None]:
    """How close the served figures come to the same server's bare endpoint and to the
    in-process floor. `rps_vs_floor_capacity` = rps / (min(workers, cores) / floor);
    `worker_cpu_ms_per_request`: the workers' CPU time per answered request (robust to other
    jobs on the machine, which lower rps but not this), against the floor."""
    cores = os.cpu_count() or 1
    capacity = min(workers, cores) / (floor_ms / 1000) if floor_ms else None
    used = recall.get("cores_used", {}).get("workers")
    cpu_ms = round(used / recall["rps"] * 1000, 3) if used and recall["rps"] else None
    return {
        "worker_cpu_ms_per_request": cpu_ms,
        "cpu_per_request_vs_floor": round(cpu_ms / floor_ms, 2) if cpu_ms and floor_ms else None,
        "rps_vs_bare": round(recall["rps"] / bare["rps"], 4) if bare["rps"] else None,
        "p50_vs_floor": round(recall["p50_ms"] / floor_ms, 2) if floor_ms else None,
        "single_p50_vs_floor": round(single["p50_ms"] / floor_ms, 2) if floor_ms else None,
        "floor_capacity_rps": round(capacity, 1) if capacity else None,
        "rps_vs_floor_capacity": round(recall["rps"] / capacity, 4) if capacity else None,
    }


def _check(
    name: str,
    value: float | None,
    target: float,
    higher_is_better: bool,
    speed: float | None = None,
) -> dict[str, Any]:
    """One target. With `speed` (this machine's share of the issue's, `serving_kit.reference`),
    also the target scaled to this machine: throughput times speed, latency divided by it."""

    def met(threshold: float) -> bool | None:
        if value is None:
            return None
        return value >= threshold if higher_is_better else value <= threshold

    op = ">=" if higher_is_better else "<="
    out: dict[str, Any] = {"target": f"{name} {op} {target}", "value": value, "ok": met(target)}
    if speed:
        scaled = round(target * speed if higher_is_better else target / speed, 2)
        out["on_this_machine"] = {"target": f"{op} {scaled}", "ok": met(scaled)}
    return out


def targets(
    results: list[dict[str, Any]],
    recall_at: dict[str, Any],
    speed: dict[int, float] | None = None,
) -> list[dict[str, Any]]:
    """The targets of issue 6 that this run's matrix covers (16 connections, k = 50); `speed`
    by worker count scales the throughput and latency ones to this machine."""
    speed = speed or {}
    out = []
    for r in results:
        if "error" in r:
            continue
        tag = f"{r['items']} {r['index']} w{r['workers']}"
        rps, p99 = r["recall"]["rps"], r["recall"]["p99_ms"]
        s = speed.get(r["workers"])
        out.append(_check(f"{tag} errors", r["recall"]["total_errors"], 0, False))
        out.append(_check(f"{tag} rps/bare", r["ratios"]["rps_vs_bare"], 0.16, True))
        if r["items"] == 1_000_000 and r["index"] == "hnsw":
            out.append(_check(f"{tag} rps", rps, 3000 if r["workers"] == 2 else 1800, True, s))
            if r["workers"] == 2:
                out.append(_check(f"{tag} p99_ms", p99, 10, False, s))
            single = r["single"]["p50_ms"]
            out.append(_check(f"{tag} single p50_ms", single, 1.0, False, speed.get(1)))
        if r["items"] == 100_000 and r["index"] == "flat" and r["workers"] == 2:
            out.append(_check(f"{tag} rps", rps, 2000, True, s))
            out.append(_check(f"{tag} p99_ms", p99, 15, False, s))
        if r["items"] == 1_000_000:
            rss = max((w["rss_mb"] for w in r["memory_after_load"]), default=None)
            out.append(_check(f"{tag} worker rss_mb", rss, 1200, False))
            out.append(_check(f"{tag} startup ready_s", r["startup"]["ready_s"], 20, False))
    for items, rec in recall_at.items():
        out.append(
            _check(
                f"{items} hnsw recall@50 (default efSearch)", rec["recall_at_default"], 0.98, True
            )
        )
    return out


def targets_of(out: dict[str, Any]) -> list[dict[str, Any]]:
    """`targets` of a report (complete, or the partial one a failed run saved): its rows,
    its sizes' HNSW recall and its machine reference's speed by worker count."""
    sizes = out.get("sizes", {})
    recall_at = {k: v["hnsw_recall"] for k, v in sizes.items() if "hnsw_recall" in v}
    speed = {r["workers"]: r["speed"] for r in out.get("machine_reference", []) if r["speed"]}
    return targets(out["results"], recall_at, speed)


def missed(checked: list[dict[str, Any]]) -> list[str]:
    """How many targets were missed as written, and how many scaled to this machine."""
    failed = [t["target"] for t in checked if t["ok"] is False]
    lines = [f"targets missed: {len(failed)} of {len(checked)}"]
    scaled = [t for t in checked if "on_this_machine" in t]
    if scaled:
        missed = [t["target"] for t in scaled if t["on_this_machine"]["ok"] is False]
        lines.append(f"speed-scaled targets missed: {len(missed)} of {len(scaled)}")
    return lines


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'items':>8} {'index':5} {'w':>2} {'rps':>8} {'p50':>7} {'p90':>7} {'p99':>7} "
        f"{'err':>5} {'bare':>8} {'ratio':>6} {'1c p50':>7} {'floor':>7} {'rss MB':>7} "
        f"{'pss MB':>7} {'ready s':>7}"
    )
    lines = [head]
    for r in results:
        if "error" in r:
            lines.append(
                f"{r['items']:>8} {r['index']:5} {r['workers']:>2} ERROR {r['error'][:60]}"
            )
            continue
        rec, bare = r["recall"], r["bare"]
        rss = max((w["rss_mb"] for w in r["memory_after_load"]), default=0.0)
        pss = max((w.get("pss_mb") or 0.0 for w in r["memory_after_load"]), default=0.0)
        flag = "*" if r.get("warnings") else " "
        lines.append(
            f"{r['items']:>8} {r['index']:5} {r['workers']:>2}{flag}{rec['rps']:>8.0f} "
            f"{rec['p50_ms']:>7.2f} {rec['p90_ms']:>7.2f} {rec['p99_ms']:>7.2f} "
            f"{rec['total_errors']:>5} {bare['rps']:>8.0f} {r['ratios']['rps_vs_bare']:>6.3f} "
            f"{r['single']['p50_ms']:>7.2f} {r['floor_p50_ms']:>7.3f} {rss:>7.0f} "
            f"{pss:>7.0f} {r['startup']['ready_s']:>7.1f}"
        )
    if any(r.get("warnings") for r in results):
        lines.append("* see the row's warnings in the JSON")
    return "\n".join(lines)


def head(args: argparse.Namespace, argv: list[str] | None, use_wrk: bool) -> dict[str, Any]:
    """The report before any measurement: the command, machine, code and load generator."""
    warning = None if use_wrk else load.FALLBACK_WARNING
    if warning:
        log(f"WARNING: {warning}")
    out: dict[str, Any] = {
        "benchmark": "serving",
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "code": code_state(args.tree),
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
    return out


def summary(out: dict[str, Any]) -> str:
    """What a complete run prints on stderr: the table, the targets missed, the machine."""
    written, *scaled = missed(out["targets"])
    lines = [table(out["results"]), written]
    for ref in out.get("machine_reference", []):
        lines.append(
            f"machine speed ({ref['workers']} worker(s)): {ref['speed']} of the issue's "
            f"(prototype bare GET {ref['rps']:.0f} rps here, {ref['issue_rps']} there)"
        )
    return "\n".join([*lines, *scaled])

"""The fault suite: each scenario on loopback with real processes, a table of what happened.

    python benchmarks/faults.py                          # every scenario, 10-minute soak
    python benchmarks/faults.py --scenarios reload,items,redis --json benchmarks/results/faults.json
    python benchmarks/faults.py --scenarios soak --soak-duration 3600
    python benchmarks/faults.py --scenarios cluster       # Redis Cluster failover

Bundles: two versions trained by the real trainer (`python -m models train --split none` on
`synthetic:seed=1|2,users=2000,items=20000`, one epoch), cached under `--cache-dir`. Every
scenario starts its own `redis-server` on a free port (`cluster`: a Redis Cluster of six) and
its own `python -m app` processes (see benchmarks/README.md, "faults.py", for what each
scenario does and expects), and stops them when it ends, also on failure. The table goes to
stdout (markdown), the full figures to `--json FILE`; the exit status is 1 when any scenario
broke an expectation.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The repository root, for the harness the tests share (and app/ and models/ of this checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving_kit.report import code_state, loadavg, machine

from harness.faults import cluster_faults, hostile, items, redis_faults, reload, shutdown, soak
from harness.faults.report import Row, table
from harness.stack import RECIPE, Stack, Versions, model_dir_with, train_two_versions

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("reload", "items", "redis", "cluster", "hostile", "shutdown", "soak")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks/results/bundles")
    p.add_argument("--workdir", type=Path, help="logs and model dirs (default: a temp dir)")
    g = p.add_argument_group("reload")
    g.add_argument("--reloads", type=int, default=20)
    g.add_argument("--replicas", default="2,2", help="worker processes of each replica")
    g = p.add_argument_group("items")
    g.add_argument("--item-rounds", type=int, default=8, help="items added and deleted")
    g = p.add_argument_group("redis")
    g.add_argument("--redis-phase", type=float, default=8.0, help="seconds each fault lasts")
    g.add_argument("--redis-workers", type=int, default=2)
    g.add_argument("--p99-budget-ms", type=float, default=250.0)
    g = p.add_argument_group("cluster")
    g.add_argument("--cluster-workers", type=int, default=2)
    g.add_argument("--cluster-steady", type=float, default=5.0, help="seconds of baseline")
    g.add_argument("--cluster-down", type=float, default=5.0, help="seconds all nodes are down")
    g = p.add_argument_group("hostile")
    g.add_argument("--fuzz-examples", type=int, default=200, help="per operation and mode")
    g.add_argument("--fuzz-seed", type=int, help="default: derandomized")
    g = p.add_argument_group("soak")
    g.add_argument("--soak-duration", type=float, default=600.0)
    g.add_argument("--soak-interval", type=float, default=30.0)
    g.add_argument("--soak-reload-every", type=float, default=20.0)
    return p.parse_args(argv)


def scenarios(args: argparse.Namespace) -> dict[str, Callable[[Stack, Versions], list[Row]]]:
    replicas = tuple(int(w) for w in args.replicas.split(","))
    return {
        "reload": lambda stack, v: reload.run(
            stack, v, reload.ReloadOptions(replicas=replicas, reloads=args.reloads)
        ),
        "items": lambda stack, v: items.run(
            stack, v, items.ItemsOptions(replicas=replicas, rounds=args.item_rounds)
        ),
        "redis": lambda stack, v: redis_faults.run(
            stack, v, redis_faults.RedisOptions(
                workers=args.redis_workers, phase_s=args.redis_phase,
                p99_budget_ms=args.p99_budget_ms,
            ),
        ),
        "cluster": lambda stack, v: cluster_faults.run(
            stack, v, cluster_faults.ClusterOptions(
                workers=args.cluster_workers, steady_s=args.cluster_steady,
                down_s=args.cluster_down, p99_budget_ms=args.p99_budget_ms,
            ),
        ),
        "hostile": lambda stack, v: hostile.run(stack, v, args.fuzz_examples, args.fuzz_seed),
        "shutdown": lambda stack, v: shutdown.run(stack, v, shutdown.ShutdownOptions()),
        "soak": lambda stack, v: soak.run(
            stack, v, soak.SoakOptions(
                duration_s=args.soak_duration, interval_s=args.soak_interval,
                reload_every_s=args.soak_reload_every,
            ),
        ),
    }  # fmt: skip


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the Stack: every process it started is stopped


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="faults-"))
    v1, v2 = train_two_versions(args.cache_dir)
    source = replace(RECIPE, seed=1).source
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "code": code_state(ROOT),
        "bundles": {"source": source, "v1": v1.name, "v2": v2.name},
        "scenarios": {},
    }
    rows: list[Row] = []
    runners = scenarios(args)
    for name in chosen:
        print(f"[{datetime.now():%H:%M:%S}] {name} ...", file=sys.stderr, flush=True)
        start, load = time.perf_counter(), loadavg()
        versions = model_dir_with(workdir / name / "artifacts", v1, v2, source)
        with Stack(workdir / name) as stack:
            found = runners[name](stack, versions)
        rows += found
        print(table(found), file=sys.stderr, flush=True)
        report["scenarios"][name] = {
            "seconds": round(time.perf_counter() - start, 1),
            "loadavg_before": load,
            "loadavg_after": loadavg(),
            "rows": [row.to_json() for row in found],
        }
    text = table(rows)
    print(text)
    print(f"\nload average {loadavg()} on {os.cpu_count()} cores; logs in {workdir}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report | {"table": text}, indent=2) + "\n")
    return 1 if any(row.problems for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The serving benchmark's parts on their own: for a service you run yourself (the compose
stack, a staging replica) or a report you already have.

    python benchmarks/serving_tools.py load URL [--users 20000] [--k 50] [--seed 0]
        [--connections 16] [--duration 10] [--generator auto|wrk|python] [--wrk-threads 1]
    python benchmarks/serving_tools.py wrk-script OUT [--users 20000] [--k 50] [--seed 0]
    python benchmarks/serving_tools.py profile RAW --duration S
    python benchmarks/serving_tools.py targets REPORT.json

`load`: closed-loop load on URL with the benchmark's generator (a recall POST for a random
user `u0`..`u<users-1>` per request, or a bare GET with `--users 0`); its figures as JSON.
`wrk-script`: the Lua script wrk runs for that load, to repeat a run by hand
(`wrk -t1 -c16 -d10s -s OUT URL`). `profile`: the shares `--profile` reports, of a profile
recorded by hand (`py-spy record --format raw --function --rate 200 --pid PID -o RAW`).
`targets`: issue 6's targets checked against a saved `serving.py --json` report, scaled by
its machine reference; also a partial report, which a run that failed midway leaves without
them. JSON goes to stdout, a summary to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

# The repository root, for the harness the tests share (serving_kit's percentiles).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving_kit import load, profile, report


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    tools = parser.add_subparsers(dest="tool", required=True)
    spec = tools.add_parser("load", help="load a running service")
    spec.add_argument("url", help="e.g. http://127.0.0.1:8000/v1/recall")
    spec.add_argument("--connections", type=int, default=16)
    spec.add_argument("--duration", type=float, default=10.0, help="seconds")
    spec.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    spec.add_argument("--wrk-threads", type=int, default=1)
    script = tools.add_parser("wrk-script", help="write the Lua script wrk runs")
    script.add_argument("out", type=Path)
    for tool in (spec, script):
        tool.add_argument("--users", type=int, default=20_000, help="0: a bare GET")
        tool.add_argument("--k", type=int, default=50)
        tool.add_argument("--seed", type=int, default=0)
    summary = tools.add_parser("profile", help="summarise a py-spy profile")
    summary.add_argument("raw", type=Path, help="a `py-spy record --format raw` file")
    summary.add_argument("--duration", type=float, required=True, help="seconds it recorded")
    targets = tools.add_parser("targets", help="check a saved report's targets")
    targets.add_argument("report", type=Path, help="a `serving.py --json` file")
    return parser.parse_args(argv)


def run_load(args: argparse.Namespace) -> int:
    use_wrk = args.generator == "wrk" or (args.generator == "auto" and load.wrk_path() is not None)
    if use_wrk and load.wrk_path() is None:
        print("error: --generator wrk, but wrk is not installed", file=sys.stderr)
        return 2
    if not use_wrk:
        print(f"warning: {load.FALLBACK_WARNING}", file=sys.stderr)
    target = load.Target(args.url, args.users, args.k, args.seed)
    result = load.run_load(
        target, args.connections, args.duration, use_wrk=use_wrk, wrk_threads=args.wrk_threads
    )
    print(json.dumps(result.to_json(), indent=2))
    print(f"{result.rps:.0f} rps, p99 {result.p99_ms} ms", file=sys.stderr)
    return 0


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.tool == "load":
        return run_load(args)
    if args.tool == "wrk-script":
        args.out.write_text(load.wrk_script(load.Target("", args.users, args.k, args.seed)))
        print(f"wrote {args.out}: wrk -t1 -c16 -d10s -s {args.out} URL", file=sys.stderr)
        return 0
    if args.tool == "profile":
        print(json.dumps(profile.summarise(args.raw, args.duration), indent=2))
        return 0
    checked = report.targets_of(json.loads(args.report.read_text()))
    print(json.dumps(checked, indent=2))
    for line in report.missed(checked):
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

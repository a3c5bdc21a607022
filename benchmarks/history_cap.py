"""What a shorter served history costs in quality: bundles scored as the service scores them
under `HISTORY_CAP=N` (each user's tower reads the newest N items), for several N.

    python -m models train --data ml-1m:../shared/data/ml-1m-half --split leave-last-n:1 \\
        --seed S --serve-history-length 0 --out /tmp/runs/sS     # S = 0, 1, 2
    python benchmarks/history_cap.py --data ml-1m:../shared/data/ml-1m-half \\
        --split leave-last-n:1 --bundles /tmp/runs/s*/2026* --caps 100,50,25 [--json F]

(A bundle reads at most what it was trained to serve: the sequential default reads its newest
50 items, so `--serve-history-length 0`, all 200, makes the caps above 50 measure something.)

Each bundle (one training seed; all trained on `--split` of `--data`) is scored through the
service's raw-feature path (`BundleRecommender`, as `python -m models evaluate --history-cap
N`), seen items excluded (all of a user's training items, whatever the cap). Per cap, and
first for the tower's own length: the per-user figures averaged over the bundles with 95 %
bootstrap intervals over users, the bundles' min..max, and the ratios to the full read and to
EASE on the same split. Beside them, `served_exclusion`: the same scores with only the items
the service stores excluded (it excludes the newest HISTORY_CAP items, the default 200 for the
tower's own length, so an older seen item can come back; a test item among the older ones
counts as found). JSON on stdout (and `--json`); a markdown table on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from quality_kit.measure import figures, seed_mean

from models.cli import check_trained_on
from models.dataset import DataError
from models.evaluation import evaluate_recommender, run_baselines
from models.recommender import BundleRecommender
from models.redis_keys import DEFAULT_HISTORY_CAP
from models.sources import load_dataset
from models.splits import make_split

SHOWN = ("hit_rate@10", "ndcg@10", "recall@50")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="a source spec: ml-1m:DIR, synthetic:…")
    parser.add_argument("--split", required=True, help="the split the bundles were trained on")
    parser.add_argument("--bundles", type=Path, nargs="+", required=True, help="one per seed")
    parser.add_argument("--caps", default="100,50,25", help="comma-separated HISTORY_CAP values")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        args.caps = [int(c) for c in args.caps.split(",")]
    except ValueError:
        parser.error(f"--caps {args.caps!r}: expected integers such as 100,50,25")
    if min(args.caps) < 1:
        parser.error("--caps: every cap must be >= 1")
    return args


def newest(train: pd.DataFrame, n: int) -> pd.DataFrame:
    """Each user's newest `n` training interactions: the history a service under
    `HISTORY_CAP=n` stores, and the only seen items it excludes."""
    ordered = train.sort_values("timestamp", kind="stable")
    return ordered.groupby("user_id", sort=False).tail(n)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    dataset = load_dataset(args.data)
    split = make_split(dataset.interactions, args.split)
    item_index = dataset.item_index()
    recommenders = [BundleRecommender(b, dataset.users, item_index) for b in args.bundles]
    for rec in recommenders:
        check_trained_on(rec.manifest, split)
    lengths = {rec.encoder.history_length for rec in recommenders}
    if len(lengths) != 1:
        raise DataError(f"the bundles' towers read different lengths: {sorted(lengths)}")
    (length,) = lengths
    ease = figures(run_baselines(split.train, split.test, item_index, names=["ease"])["ease"])
    rows: dict[str, Any] = {}
    for cap in [None, *args.caps]:
        reads = min(cap or length, length)
        stored = newest(split.train, cap or max(length, DEFAULT_HISTORY_CAP))  # excluded
        runs, served = [], []
        for rec in recommenders:
            rec.history_cap = cap
            rec.fit(split.train, item_index)
            runs.append(evaluate_recommender(rec, split.train, split.test, item_index))
            served.append(evaluate_recommender(rec, stored, split.test, item_index))
        mean = seed_mean(runs)
        n_users = len(mean.user_ids)
        row = figures(mean)
        row["reads"] = reads
        row["served_exclusion"] = figures(seed_mean(served))
        row["seed_range"] = {
            m: [min(r.means[m] for r in runs), max(r.means[m] for r in runs)] for m in SHOWN
        }
        full = rows["full"]["means"] if rows else row["means"]
        row["vs_full"] = {m: row["means"][m] / full[m] for m in SHOWN if full[m]}
        row["vs_ease"] = {m: row["means"][m] / ease["means"][m] for m in SHOWN if ease["means"][m]}
        rows["full" if cap is None else str(cap)] = row
    return {
        "benchmark": "history_cap",
        "data": args.data,
        "split": split.name,
        "bundles": [str(b) for b in args.bundles],
        "tower_reads": length,
        "n_test_users": n_users,
        "ease": ease,
        "caps": rows,
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        f"{report['split']}, {len(report['bundles'])} bundles (mean; seeds min..max), "
        f"{report['n_test_users']} test users, 95 % intervals over users",
        "",
        "| HISTORY_CAP | tower reads | HR@10 [95 % CI] | NDCG@10 [95 % CI] | recall@50 "
        "| HR@10 seeds | x full read (HR@10 / NDCG@10) | x EASE (HR@10 / NDCG@10) "
        "| HR@10 / NDCG@10, only the stored items excluded |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cap, row in report["caps"].items():
        means, ci, seeds = row["means"], row["ci95"], row["seed_range"]
        cells = [
            "none" if cap == "full" else cap,
            str(row["reads"]),
            *(f"{means[m]:.3f} [{ci[m][0]:.3f}, {ci[m][1]:.3f}]" for m in SHOWN[:2]),
            f"{means['recall@50']:.3f}",
            "{:.3f}..{:.3f}".format(*seeds["hit_rate@10"]),
            *(
                " / ".join(f"{row[key].get(m, float('nan')):.3f}" for m in SHOWN[:2])
                for key in ("vs_full", "vs_ease")
            ),
            " / ".join(f"{row['served_exclusion']['means'][m]:.3f}" for m in SHOWN[:2]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        report = measure(args)
    except (DataError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(report), file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

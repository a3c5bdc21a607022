"""Retrieval quality on real data: the two-tower vs classic baselines, every split x method.

    python benchmarks/quality.py --data ../shared/data/ml-1m-half [--seeds 0,1,2] [--json F]

Trains one two-tower model per split and seed with the trainer's defaults (or the options
given), evaluates it and the baselines (most-popular, itemCF, itemCF-IUF, EASE) with the same
evaluation code, seen items excluded, and prints a JSON table: per method and split, the
mean over seeds of recall/NDCG/hit-rate@K, a 95 % bootstrap interval over users, and the
pooled recall (total hits / total relevant, the convention of some published figures).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.cli import add_tower_args, add_train_args, train_config
from models.evaluation import EvalResult, run_baselines
from models.pipeline import run_training
from models.sources import load_dataset

# The seed experiment this project grew from (MovieLens-1M, its own protocol on seed-2003).
SEED_EXPERIMENT = {"two_tower_recall@50": [0.052, 0.071], "itemcf_recall@50": 0.057}
KEYS = ("recall@10", "recall@50", "recall@100", "ndcg@10", "ndcg@50", "hit_rate@50")


def summarise(results: list[EvalResult]) -> dict[str, Any]:
    """Mean over runs (seeds); bootstrap CI of recall@50 over users pooled from all runs."""
    out: dict[str, Any] = {k: float(np.mean([r.means[k] for r in results])) for k in KEYS}
    per_user = np.mean([r.per_user["recall@50"] for r in results], axis=0)
    rng = np.random.default_rng(0)
    boots = [per_user[rng.integers(0, len(per_user), len(per_user))].mean() for _ in range(1000)]
    out["recall@50_ci95"] = [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]
    out["pooled_recall@50"] = float(np.mean([r.pooled_recall(50) for r in results]))
    if len(results) > 1:
        out["recall@50_seed_std"] = float(np.std([r.means["recall@50"] for r in results]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        default="../shared/data/ml-1m-half",
        help="a MovieLens directory (read with --source) or a full source spec such as "
        "synthetic:seed=1,users=300,items=200 (smoke tests)",
    )
    parser.add_argument("--source", default="ml-1m", help="source scheme for a --data directory")
    parser.add_argument("--splits", default="last-10pct,seed-2003")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--json", type=Path, help="also write the table here")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log each epoch's validation figures"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (the model is small: more threads mostly synchronise, and "
        "on a shared 2-core machine they made training several times slower)",
    )
    add_train_args(parser)
    add_tower_args(parser)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    torch.set_num_threads(args.threads)
    is_spec = args.data.startswith("synthetic")
    if not is_spec and not Path(args.data).is_dir():
        print(
            f"data directory {args.data} is absent: nothing measured. The benchmark needs "
            "MovieLens-1M files (users.dat, movies.dat, ratings.dat).",
            file=sys.stderr,
        )
        return 2
    dataset = load_dataset(args.data if is_spec else f"{args.source}:{args.data}")
    seeds = [int(s) for s in args.seeds.split(",")]
    table: dict[str, Any] = {
        "dataset": "ML-1M (users 1-2999)" if "ml-1m-half" in args.data else args.data,
        "data": dataset.summary(),
        "seed_experiment_published": SEED_EXPERIMENT,
        "config": vars(args) | {"json": None},
        "splits": {},
    }
    for split in args.splits.split(","):
        runs: list[EvalResult] = []
        seconds: list[float] = []
        epochs: list[int] = []
        validation: list[dict[str, float] | None] = []
        priors: list[list[float]] = []
        for seed in seeds:
            config = replace(train_config(args), seed=seed)
            start = time.perf_counter()
            run = run_training(dataset, split, config, None)
            seconds.append(time.perf_counter() - start)
            epochs.append(run.trained.best_epoch)
            runs.append(run.results["two_tower"])
            validation.append(run.validation)
            priors.append([run.trained.prior_weight, run.trained.prior_half_life_days])
            print(
                f"{split} seed {seed}: recall@50 {runs[-1].means['recall@50']:.4f} "
                f"({seconds[-1]:.0f} s)",
                file=sys.stderr,
            )
        assert run.split is not None
        item_index = {str(i): r for r, i in enumerate(dataset.items.index)}
        baselines = run_baselines(run.split.train, run.split.test, item_index)
        methods = {"two_tower": summarise(runs)} | {
            name: summarise([result]) for name, result in baselines.items()
        }
        baseline_figures = [v for k, v in methods.items() if k != "two_tower"]
        best = max(v["recall@50"] for v in baseline_figures)
        best_pooled = max(v["pooled_recall@50"] for v in baseline_figures)
        table["splits"][split] = {
            "n_test_users": len(runs[0].user_ids),
            "methods": methods,
            "two_tower_train_seconds": seconds,
            "two_tower_best_epochs": epochs,
            "two_tower_validation": validation,
            "two_tower_prior_weight_and_half_life": priors,
            "two_tower_vs_best_baseline_recall@50": methods["two_tower"]["recall@50"] / best,
            "two_tower_vs_best_baseline_pooled_recall@50": (
                methods["two_tower"]["pooled_recall@50"] / best_pooled
            ),
        }
    text = json.dumps(table, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

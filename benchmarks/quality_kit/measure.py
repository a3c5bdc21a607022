"""One split measured: a two-tower training per seed through the trainer's public entry point
(`models.pipeline.run_training`), the four baselines once (they are deterministic), every
method by the same evaluation code, then issue 19's ratios and the training times."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch

from models.dataset import Dataset
from models.evaluation import EvalResult, measurable_sets, run_baselines
from models.metrics import CI_RESAMPLES, CI_SEED, means
from models.pipeline import run_training
from models.splits import Split, make_split
from models.train_config import TrainConfig
from quality_kit.references import (
    MAX_TRAIN_SECONDS,
    METRICS,
    PUBLISHED_NEXT_ITEM,
    TABLE_METRICS,
    TARGETS,
    protocol,
)


def applicable(dataset: Dataset, spec: str) -> Split | str:
    """The split, or why the data cannot make it (the reason of `make_split` or the
    evaluation's measurability check)."""
    item_index = dataset.item_index()
    try:
        split = make_split(dataset.interactions, spec)
        measurable_sets(split.train, split.test, item_index)
    except ValueError as exc:  # DataError included
        return str(exc)
    return split


def seed_mean(results: Sequence[EvalResult]) -> EvalResult:
    """One result whose per-user figures are the runs' averages (same test users in each)."""
    first = results[0]
    if any(r.user_ids != first.user_ids for r in results):
        raise RuntimeError("the seeds' runs evaluated different users")
    per_user = {k: np.mean([r.per_user[k] for r in results], axis=0) for k in first.per_user}
    return dataclasses.replace(
        first,
        means=means(per_user),
        per_user=per_user,
        eval_seconds=sum(r.eval_seconds for r in results),
    )


def figures(result: EvalResult) -> dict[str, Any]:
    """Every metric of `METRICS` with its 95 % bootstrap interval over users."""
    means = {m: result.means[m] for m in METRICS if m in result.means}
    means["pooled_recall@50"] = result.pooled_recall(50)
    intervals = result.intervals(CI_RESAMPLES, CI_SEED)
    ci95 = {m: list(intervals[m]) for m in means if m in intervals}
    ci95["pooled_recall@50"] = list(result.pooled_recall_ci(50, CI_RESAMPLES, CI_SEED))
    return {"means": means, "ci95": ci95}


def compare(methods: Mapping[str, Any], metric: str, against: str) -> dict[str, Any]:
    """Two-tower / a baseline on `metric`: `against` names one, or is "best baseline" (the
    best of the four on that metric)."""
    baselines = {k: v["means"] for k, v in methods.items() if k != "two_tower"}
    name = against if against in baselines else max(baselines, key=lambda b: baselines[b][metric])
    ours, value = methods["two_tower"]["means"][metric], baselines[name][metric]
    return {
        "baseline": name,
        "two_tower": ours,
        "baseline_value": value,
        "ratio": ours / value if value else None,
    }


def targets(spec: str, methods: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 19's ratios for `spec`, each with its baseline and pass or fail."""
    rows = []
    for metric, against, target in TARGETS.get(spec, ()):
        row = {"metric": metric, "against": against, **compare(methods, metric, against)}
        row |= {"target": target, "pass": row["two_tower"] >= target * row["baseline_value"]}
        rows.append(row)
    return rows


def ratios(methods: Mapping[str, Any]) -> dict[str, Any]:
    """Two-tower / EASE and two-tower / the best baseline on every table metric, for every
    split (`targets` holds the ones the issue sets)."""
    return {
        key: {m: compare(methods, m, against) for m in TABLE_METRICS}
        for key, against in (("vs_ease", "ease"), ("vs_best_baseline", "best baseline"))
    }


def train_seeds(
    dataset: Dataset, split: Split, seeds: Sequence[int], config: TrainConfig, jobs: int = 1
) -> tuple[list[EvalResult], list[dict[str, Any]]]:
    """One two-tower training per seed, `jobs` at a time (one process each, with this
    process's torch threads): each run's test result, and its record, in seed order."""
    if jobs <= 1 or len(seeds) == 1:
        done = [train_seed(dataset, split.name, config, seed) for seed in seeds]
    else:
        # Spawned, not forked: a child forked from a process that has run torch's thread
        # pool can hang in it. Each child gets the dataset pickled, the parent's threads and
        # log level.
        context = multiprocessing.get_context("spawn")
        settings = (torch.get_num_threads(), logging.getLogger().level)
        with ProcessPoolExecutor(
            min(jobs, len(seeds)), mp_context=context, initializer=_child, initargs=settings
        ) as pool:
            done = list(pool.map(partial(train_seed, dataset, split.name, config), seeds))
    return [run for run, _ in done], [record for _, record in done]


def _child(threads: int, level: int) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")


def train_seed(
    dataset: Dataset, split_name: str, config: TrainConfig, seed: int
) -> tuple[EvalResult, dict[str, Any]]:
    """One two-tower training: its test result and its record."""
    start = time.perf_counter()
    run = run_training(dataset, split_name, dataclasses.replace(config, seed=seed), None)
    seconds = time.perf_counter() - start
    result = run.results["two_tower"]
    record = {
        "seed": seed,
        "seconds": seconds,
        "best_epoch": run.trained.best_epoch,
        "prior_weight": run.trained.prior_weight,
        "prior_half_life_days": run.trained.prior_half_life_days,
        "validation": run.validation,
        "test": figures(result)["means"],
    }
    recall = result.means["recall@10"]
    print(f"{split_name} seed {seed}: recall@10 {recall:.4f} ({seconds:.0f} s)", file=sys.stderr)
    return result, record


def training_time(records: Sequence[Mapping[str, Any]], at_once: int) -> dict[str, Any]:
    """Each run's training seconds against the budget, which is for one run with the machine
    to itself: runs that shared its cores (`--jobs`) are timed but not judged (`pass` None)."""
    seconds = [r["seconds"] for r in records]
    return {
        "seconds": seconds,
        "limit_seconds": MAX_TRAIN_SECONDS,
        "runs_at_once": at_once,
        "threads_per_run": torch.get_num_threads(),
        "pass": max(seconds) <= MAX_TRAIN_SECONDS if at_once == 1 else None,
    }


def measure(
    dataset: Dataset, split: Split, seeds: Sequence[int], config: TrainConfig, jobs: int = 1
) -> dict[str, Any]:
    """One split: a two-tower training per seed (`jobs` at a time), the baselines once,
    targets and times."""
    runs, records = train_seeds(dataset, split, seeds, config, jobs)
    ours = figures(seed_mean(runs))
    ours["seed_range"] = {
        m: [min(r["test"][m] for r in records), max(r["test"][m] for r in records)]
        for m in ours["means"]
    }
    item_index = dataset.item_index()
    methods = {"two_tower": ours}
    for name, result in run_baselines(split.train, split.test, item_index).items():
        methods[name] = figures(result) | {"fit_seconds": result.fit_seconds}
    checks = targets(split.name, methods)
    training = training_time(records, min(jobs, len(seeds)))
    trainer = dataclasses.asdict(config)
    trainer.pop("seed")
    out = {
        "applicable": True,
        "protocol": protocol(split.name),
        "trainer_config": trainer,  # the options given over this split's defaults
        "split": split.summary(),
        "n_test_users": len(runs[0].user_ids),  # evaluated: with an item not seen in train
        "methods": methods,
        "two_tower_runs": records,
        "ratios": ratios(methods),
        "targets": checks,
        "training": training,
        "pass": training["pass"] is True and all(c["pass"] for c in checks),
    }
    if split.name == "leave-last-n:1":
        out["published_references"] = PUBLISHED_NEXT_ITEM
    return out

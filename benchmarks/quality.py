"""Retrieval quality: the two-tower model against the classic baselines, per split.

    python benchmarks/quality.py --data ../shared/data/ml-1m-half --json F [--markdown F]
    python benchmarks/quality.py ... --train-args "--user-tower sequence --epochs 40"
    python benchmarks/quality.py --render F [F ...]   # the markdown of saved --json files

Splits (`--splits`; by default all three, the next-item protocol first): `leave-last-n:1`
(each user's last interaction held out: the literature's protocol for sequential models),
`last-10pct` (a global time split: closest to production) and `seed-2003` (the seed
experiment's time cut). A split the data cannot make is reported as not applicable.

Per split: one two-tower training per seed through the trainer's public entry point
(`models.pipeline.run_training`, trainer defaults unless options are given, directly or as
`--train-args`), the four baselines once (they are deterministic), all by the same evaluation
code, seen items excluded. Per method: recall@10/50/100, NDCG@10/50, hit-rate@10/50 and
pooled recall@50 (total hits / total relevant), each with a 95 % bootstrap interval over
users; the two-tower's figures are its per-user figures averaged over the seeds, with the
seeds' min..max beside them. Then the ratios the targets name, pass or fail, and the wall
time of every run. JSON on stdout (and `--json`); the markdown table on stderr (and
`--markdown`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.baselines import check_dense_fits
from models.cli import add_tower_args, add_train_args, train_config
from models.dataset import DataError, Dataset
from models.evaluation import CI_RESAMPLES, CI_SEED, EvalResult, measurable_sets, run_baselines
from models.pipeline import run_training
from models.sources import load_dataset
from models.splits import VALID_FORMS, Split, is_next_item, make_split

DEFAULT_SPLITS = "leave-last-n:1,last-10pct,seed-2003"
PROTOCOLS = {  # spec -> (name, what it answers)
    "leave-last-n": (
        "next-item",
        "each user's last {n} held out: the literature's protocol for sequential models",
    ),
    "last-10pct": (
        "global time split",
        "the last 10 % of the log by time, users seen before the cut: closest to production",
    ),
    "seed-2003": (
        "seed experiment's time cut",
        "everything from 2003-01-01 on, users seen before it: the protocol this project grew from",
    ),
}
METRICS = (
    *("recall@10", "recall@50", "recall@100", "ndcg@10", "ndcg@50"),
    *("hit_rate@10", "hit_rate@50", "pooled_recall@50"),
)
TABLE_METRICS = ("recall@10", "recall@50", "ndcg@10", "ndcg@50", "pooled_recall@50")
LABELS = {
    "two_tower": "two-tower",
    "most_popular": "most-popular",
    "itemcf": "itemCF",
    "itemcf_iuf": "itemCF-IUF",
    "ease": "EASE",
    **{m: m.replace("ndcg", "NDCG").replace("_", " ") for m in METRICS},
}
# Issue 19's targets: (metric, baseline: "ease" or the best baseline on that metric, ratio).
TARGETS = {
    "leave-last-n:1": (("recall@10", "ease", 2.5), ("ndcg@10", "ease", 2.5)),
    "last-10pct": (
        ("recall@10", "best baseline", 1.15),
        ("recall@50", "best baseline", 1.0),
        ("pooled_recall@50", "best baseline", 1.0),
    ),
}
DASH, TIMES = "\u2013", "\u00d7"  # for the markdown
MAX_TRAIN_SECONDS = 1800.0  # per run (one seed of one split), on the 2-core CPU machine
# Published next-item figures on the full ML-1M (6,040 users; leave-one-out, full ranking),
# shown beside `leave-last-n:1` for orientation only: our data is ML-1M users 1-2999, so they
# are not comparable one-to-one. Issue 19's 2.5x EASE target is about where they lie.
# - Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018 (SASRec, sampled
#   softmax), as re-evaluated with full ranking by the two papers below;
# - Petrov & Macdonald, "gSASRec: Reducing Overconfidence in Sequential Recommendation Trained
#   with Negative Sampling", RecSys 2023;
# - Klenitskiy & Vasilev, "Turning Dross Into Gold Loss: is BERT4Rec really better than
#   SASRec?", RecSys 2023 (SASRec with full cross-entropy).
PUBLISHED_NEXT_ITEM = (
    {
        "name": "SASRec, sampled softmax (Kang & McAuley 2018, re-evaluated with full ranking)",
        "hit_rate@10": [0.285, 0.285],
        "ndcg@10": None,
    },
    {
        "name": "gSASRec / SASRec with full cross-entropy "
        "(Petrov & Macdonald 2023; Klenitskiy & Vasilev 2023)",
        "hit_rate@10": [0.30, 0.315],
        "ndcg@10": [0.16, 0.18],
    },
)
# The seed experiment this project grew from (MovieLens-1M, seed-2003, seen items kept).
SEED_EXPERIMENT = {"two_tower_recall@50": [0.052, 0.071], "itemcf_recall@50": 0.057}


def trainer_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="--train-args", add_help=False)
    add_train_args(parser)
    add_tower_args(parser)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        default="../shared/data/ml-1m-half",
        help="a data directory (read with --source) or a synthetic source spec such as "
        "synthetic:seed=1,users=300,items=200 (smoke tests)",
    )
    parser.add_argument("--source", default="ml-1m", help="source scheme of a --data directory")
    parser.add_argument("--splits", default=DEFAULT_SPLITS, help=f"comma-separated: {VALID_FORMS}")
    parser.add_argument("--seeds", default="0,1,2", help="two-tower training seeds")
    parser.add_argument(
        "--train-args",
        default="",
        help='trainer options as one string, e.g. "--user-tower sequence --epochs 40" (after '
        "any given directly; the seed comes from --seeds)",
    )
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    parser.add_argument("--markdown", type=Path, help="also write the markdown table here")
    parser.add_argument(
        "--render",
        type=Path,
        nargs="+",
        help="print the markdown table of --json files (several: e.g. one process per split, "
        "same data, seeds and trainer options) and exit",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (the model is small: more threads mostly synchronise, and "
        "on a shared 2-core machine they made training several times slower)",
    )
    add_train_args(parser)
    add_tower_args(parser)
    # `--train-args X` as `--train-args=X`: argparse would take a lone "--no-refit" for an option.
    joined, rest = [], iter(argv)
    for arg in rest:
        joined.append(f"--train-args={next(rest, '')}" if arg == "--train-args" else arg)
    args = parser.parse_args(joined)
    args = trainer_parser().parse_args(shlex.split(args.train_args), namespace=args)
    if args.seed != trainer_parser().get_default("seed"):
        parser.error("--seed: each run's seed comes from --seeds")
    for spec in args.splits.split(","):
        if spec not in PROTOCOLS and not is_next_item(spec):
            parser.error(f"unknown split {spec!r}; expected {VALID_FORMS}")
    return args


def trainer_record(args: argparse.Namespace) -> dict[str, Any]:
    """The trainer options that differ from the defaults, and the whole config."""
    defaults = vars(trainer_parser().parse_args([]))
    options = {k: getattr(args, k) for k, v in defaults.items() if getattr(args, k) != v}
    config = dataclasses.asdict(train_config(args))
    config.pop("seed")
    return {"train_args": args.train_args, "options": options, "config": config}


def load(args: argparse.Namespace) -> Dataset:
    if args.data.startswith("synthetic"):
        return load_dataset(args.data)
    if not Path(args.data).is_dir():
        raise DataError(
            f"data directory {args.data} is absent: nothing measured. The benchmark needs "
            "MovieLens-1M files (users.dat, movies.dat, ratings.dat)"
        )
    return load_dataset(f"{args.source}:{args.data}")


def applicable(dataset: Dataset, spec: str) -> Split | str:
    """The split, or why the data cannot make it (the reason of `make_split` or the
    evaluation's measurability check)."""
    item_index = {str(i): r for r, i in enumerate(dataset.items.index)}
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
        means={k: float(v.mean()) for k, v in per_user.items()},
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


def measure(
    dataset: Dataset, split: Split, seeds: Sequence[int], args: argparse.Namespace
) -> dict[str, Any]:
    """One split: a two-tower training per seed, the baselines once, targets and times."""
    runs, records = [], []
    for seed in seeds:
        config = dataclasses.replace(train_config(args), seed=seed)
        start = time.perf_counter()
        run = run_training(dataset, split.name, config, None)
        seconds = time.perf_counter() - start
        runs.append(run.results["two_tower"])
        records.append(
            {
                "seed": seed,
                "seconds": seconds,
                "best_epoch": run.trained.best_epoch,
                "prior_weight": run.trained.prior_weight,
                "prior_half_life_days": run.trained.prior_half_life_days,
                "validation": run.validation,
                "test": figures(runs[-1])["means"],
            }
        )
        recall = runs[-1].means["recall@10"]
        print(
            f"{split.name} seed {seed}: recall@10 {recall:.4f} ({seconds:.0f} s)", file=sys.stderr
        )
    ours = figures(seed_mean(runs))
    ours["seed_range"] = {
        m: [min(r["test"][m] for r in records), max(r["test"][m] for r in records)]
        for m in ours["means"]
    }
    item_index = {str(i): r for r, i in enumerate(dataset.items.index)}
    methods = {"two_tower": ours}
    for name, result in run_baselines(split.train, split.test, item_index).items():
        methods[name] = figures(result) | {"fit_seconds": result.fit_seconds}
    checks = targets(split.name, methods)
    longest = max(r["seconds"] for r in records)
    training = {"seconds": [r["seconds"] for r in records], "limit_seconds": MAX_TRAIN_SECONDS}
    training["pass"] = longest <= MAX_TRAIN_SECONDS
    out = {
        "applicable": True,
        "protocol": protocol(split.name),
        "split": split.summary(),
        "n_test_users": len(runs[0].user_ids),  # evaluated: with an item not seen in train
        "methods": methods,
        "two_tower_runs": records,
        "ratios": ratios(methods),
        "targets": checks,
        "training": training,
        "pass": training["pass"] and all(c["pass"] for c in checks),
    }
    if split.name == "leave-last-n:1":
        out["published_references"] = PUBLISHED_NEXT_ITEM
    return out


def protocol(spec: str) -> dict[str, str]:
    """What the split is and which question it answers."""
    if is_next_item(spec):
        name, description = PROTOCOLS["leave-last-n"]
        n = int(spec.split(":")[1])
        held_out = "interaction" if n == 1 else f"{n} interactions"
        return {"name": name, "description": description.format(n=held_out)}
    name, description = PROTOCOLS[spec]
    return {"name": name, "description": description}


def ratios(methods: Mapping[str, Any]) -> dict[str, Any]:
    """Two-tower / EASE and two-tower / the best baseline on every table metric, for every
    split (`targets` holds the ones the issue sets)."""
    return {
        key: {m: compare(methods, m, against) for m in TABLE_METRICS}
        for key, against in (("vs_ease", "ease"), ("vs_best_baseline", "best baseline"))
    }


def commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip() or None


def _cell(figure: Mapping[str, Any], metric: str) -> str:
    low, high = figure["ci95"][metric]
    return f"{figure['means'][metric]:.4f} [{low:.3f}, {high:.3f}]"


def _span(bounds: Sequence[float] | None, digits: int = 3) -> str:
    if bounds is None:
        return DASH
    low, high = bounds
    return f"{low:.{digits}f}" if low == high else f"{low:.{digits}f}{DASH}{high:.{digits}f}"


def _ratio(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}{TIMES}"


def merge(tables: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several runs' JSON as one table (e.g. one process per split on a 2-core machine)."""
    merged = dict(tables[0])
    for other in tables[1:]:
        differ = [k for k in ("data", "seeds") if other[k] != merged[k]]
        if other["trainer"]["config"] != merged["trainer"]["config"]:
            differ.append("trainer options")
        if differ:
            raise ValueError(f"the runs differ in {', '.join(differ)}: not one table")
    for key, joint in (("command", " && "), ("commit", ", ")):
        merged[key] = joint.join(dict.fromkeys(str(t[key]) for t in tables))
    merged["splits"] = {k: v for t in tables for k, v in t["splits"].items()}
    merged["pass"] = passed(merged["splits"])
    return merged


def passed(splits: Mapping[str, Any]) -> bool:
    """Every target of every measured split met, and at least one split measured."""
    measured = [s for s in splits.values() if s["applicable"]]
    return bool(measured) and all(s["pass"] for s in measured)


def render(table: Mapping[str, Any]) -> str:
    """The markdown of a benchmark's JSON: a summary of the splits, then one table each."""
    options = table["trainer"]["options"]
    trainer = " ".join(f"{k}={v}" for k, v in options.items()) if options else "defaults"
    seeds = ", ".join(map(str, table["seeds"]))
    lines = [
        f"## Retrieval quality: {table['dataset']}",
        "",
        f"`{table['command']}` (commit {table['commit']}). Trainer: {trainer}. Two-tower: mean "
        f"of seeds {seeds} (per-user figures averaged over the seeds); baselines once per split "
        "(deterministic); one evaluation code for all, seen items excluded. [low, high]: "
        f"{table['intervals']}; seeds: min..max of the seeds' figures.",
        "",
        "| split | protocol | test users | targets |",
        "|---|---|---|---|",
    ]
    for spec, s in table["splits"].items():
        what = f"**{s['protocol']['name']}**: {s['protocol']['description']}"
        if not s["applicable"]:
            lines.append(f"| `{spec}` | {what} | {DASH} | not applicable: {s['reason']} |")
            continue
        ratios_met = sum(c["pass"] for c in s["targets"])
        verdict = (
            f"{ratios_met} of {len(s['targets'])} ratio targets met"
            if s["targets"]
            else "no ratio target"
        )
        training = "met" if s["training"]["pass"] else "**not met**"
        lines.append(
            f"| `{spec}` | {what} | {s['n_test_users']} | {verdict}; training time {training} |"
        )
    for spec, s in table["splits"].items():
        if s["applicable"]:
            lines += ["", *_split_table(spec, s)]
    return "\n".join(lines)


def _split_table(spec: str, s: Mapping[str, Any]) -> list[str]:
    methods, cols = s["methods"], len(TABLE_METRICS)
    ours = methods["two_tower"]
    lines = [
        f"### `{spec}` ({s['protocol']['name']})",
        "",
        "| method | " + " | ".join(LABELS[m] for m in TABLE_METRICS) + " |",
        "|---|" + "---|" * cols,
        f"| **two-tower** (mean of {len(s['two_tower_runs'])}) | "
        + " | ".join(_cell(ours, m) for m in TABLE_METRICS)
        + " |",
        "| ↳ seeds min..max | "
        + " | ".join("{:.4f}..{:.4f}".format(*ours["seed_range"][m]) for m in TABLE_METRICS)
        + " |",
    ]
    for name, figure in methods.items():
        if name != "two_tower":
            lines.append(
                f"| {LABELS[name]} | " + " | ".join(_cell(figure, m) for m in TABLE_METRICS) + " |"
            )
    for ref in s.get("published_references", ()):
        cells = [DASH] * cols
        cells[TABLE_METRICS.index("recall@10")] = f"HR@10 {_span(ref['hit_rate@10'])}"
        cells[TABLE_METRICS.index("ndcg@10")] = _span(ref["ndcg@10"])
        lines.append(f"| *published, full ML-1M: {ref['name']}* | " + " | ".join(cells) + " |")
    if "published_references" in s:
        lines += [
            "",
            "Published rows: full ML-1M (6,040 users), leave-one-out with full ranking; not "
            f"comparable one-to-one with ours (ML-1M users 1{DASH}2999). One held-out item per "
            "user, so HR@10 is recall@10.",
        ]
    lines += [
        "",
        "| target | two-tower | against | ratio | target | |",
        "|---|---|---|---|---|---|",
    ]
    for c in s["targets"]:
        against = f"{LABELS[c['baseline']]} {c['baseline_value']:.4f}"
        if c["against"] != c["baseline"]:
            against = f"best baseline: {against}"
        lines.append(
            f"| {LABELS[c['metric']]} | {c['two_tower']:.4f} | {against} | {_ratio(c['ratio'])} "
            f"| ≥ {c['target']:g}{TIMES} | {'pass' if c['pass'] else '**fail**'} |"
        )
    training = s["training"]
    times = " / ".join(f"{t:.0f}" for t in training["seconds"])
    lines.append(
        f"| training per run | {times} s | | | ≤ {training['limit_seconds']:.0f} s "
        f"| {'pass' if training['pass'] else '**fail**'} |"
    )
    best, ease = s["ratios"]["vs_best_baseline"], s["ratios"]["vs_ease"]
    lines += [
        "",
        "Two-tower / best baseline: "
        + ", ".join(
            f"{LABELS[m]} {_ratio(c['ratio'])} ({LABELS[c['baseline']]})" for m, c in best.items()
        )
        + "; / EASE: "
        + ", ".join(f"{LABELS[m]} {_ratio(c['ratio'])}" for m, c in ease.items())
        + ".",
    ]
    return lines


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.render is not None:
        try:
            print(render(merge([json.loads(path.read_text()) for path in args.render])))
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    torch.set_num_threads(args.threads)
    try:
        for path in (args.json, args.markdown):  # made before hours of training, not after
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
        dataset = load(args)
        check_dense_fits(len(dataset.items), "the baselines")
    except (DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    table: dict[str, Any] = {
        "benchmark": "quality",
        "dataset": f"ML-1M (users 1{DASH}2999)" if "ml-1m-half" in args.data else args.data,
        "data": dataset.summary(),
        "command": shlex.join(["python", "benchmarks/quality.py", *argv]),
        "commit": commit(),
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads},
        "seeds": seeds,
        "trainer": trainer_record(args),
        "intervals": f"95 % percentile bootstrap over users, {CI_RESAMPLES} resamples",
        "seed_experiment_published": SEED_EXPERIMENT,
        "splits": {},
    }
    # Every split made (or found inapplicable) before the first hour of training.
    splits = {spec: applicable(dataset, spec) for spec in args.splits.split(",")}
    for spec, split in splits.items():
        if isinstance(split, str):
            print(f"{spec}: not applicable: {split}", file=sys.stderr)
    for spec, split in splits.items():
        table["splits"][spec] = (
            {"applicable": False, "protocol": protocol(spec), "reason": split}
            if isinstance(split, str)
            else measure(dataset, split, seeds, args)
        )
    table["pass"] = passed(table["splits"])
    text = json.dumps(table, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        args.json.write_text(text)
    markdown = render(table)
    print(markdown, file=sys.stderr)
    if args.markdown:
        args.markdown.write_text(markdown + "\n")
    if not any(split["applicable"] for split in table["splits"].values()):
        print("error: no split applies to this data: nothing measured", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

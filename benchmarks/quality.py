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
import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from quality_kit.measure import applicable, measure
from quality_kit.references import DEFAULT_SPLITS, SEED_EXPERIMENT, known_split, protocol
from quality_kit.render import DASH, merge, passed, render

from models.baselines import check_dense_fits
from models.cli import add_tower_args, add_train_args, train_config
from models.dataset import DataError, Dataset
from models.metrics import CI_RESAMPLES
from models.options import given_options
from models.sources import load_dataset
from models.splits import VALID_FORMS
from models.train_config import TrainConfig


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
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="seeds trained at once, one process each with --threads threads (the runs' "
        "wall times then share the machine)",
    )
    add_train_args(parser)
    add_tower_args(parser)
    # `--train-args X` as `--train-args=X`: argparse would take a lone "--no-refit" for an option.
    joined, rest = [], iter(argv)
    for arg in rest:
        joined.append(f"--train-args={next(rest, '')}" if arg == "--train-args" else arg)
    args = parser.parse_args(joined)
    args = trainer_parser().parse_args(shlex.split(args.train_args), namespace=args)
    if "seed" in vars(args):
        parser.error("--seed: each run's seed comes from --seeds")
    for spec in args.splits.split(","):
        if not known_split(spec):
            parser.error(f"unknown split {spec!r}; expected {VALID_FORMS}")
    return args


def trainer_record(args: argparse.Namespace) -> dict[str, Any]:
    """The trainer options given (by their field's name). Each split records the whole
    config it trained with: the defaults (the user tower first) follow the split's protocol."""
    given = given_options(args, TrainConfig)
    options = {path.rpartition(".")[2]: value for path, value in given.items()}
    return {"train_args": args.train_args, "options": options}


def load(args: argparse.Namespace) -> Dataset:
    if args.data.startswith("synthetic"):
        return load_dataset(args.data)
    if not Path(args.data).is_dir():
        raise DataError(
            f"data directory {args.data} is absent: nothing measured. The benchmark needs "
            "MovieLens-1M files (users.dat, movies.dat, ratings.dat)"
        )
    return load_dataset(f"{args.source}:{args.data}")


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


def render_saved(paths: Sequence[Path]) -> int:
    """Print the markdown of saved --json files as one table."""
    try:
        print(render(merge([json.loads(path.read_text()) for path in paths])))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


# Options that say where the report goes or how much it logs, not what it measures.
OUTPUT_OPTIONS = {"--json": 1, "--markdown": 1, "-v": 0, "--verbose": 0}


def reproducing(argv: Sequence[str]) -> list[str]:
    """`argv` without the output options: the command that measures the same figures (the
    JSON records it, and a path on the measuring machine means nothing elsewhere)."""
    kept: list[str] = []
    skip = 0
    for arg in argv:
        if skip:
            skip -= 1
        elif arg in OUTPUT_OPTIONS:
            skip = OUTPUT_OPTIONS[arg]
        elif arg.split("=", 1)[0] not in OUTPUT_OPTIONS:
            kept.append(arg)
    return kept


def measure_all(dataset: Dataset, args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Every split: measured, or reported not applicable with the reason."""
    seeds = [int(s) for s in args.seeds.split(",")]
    table: dict[str, Any] = {
        "benchmark": "quality",
        "dataset": f"ML-1M (users 1{DASH}2999)" if "ml-1m-half" in args.data else args.data,
        "data": dataset.summary(),
        "command": shlex.join(["python", "benchmarks/quality.py", *reproducing(argv)]),
        "commit": commit(),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": args.threads,
            "jobs": args.jobs,
        },
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
            else measure(dataset, split, seeds, train_config(args, spec), args.jobs)
        )
    table["pass"] = passed(table["splits"])
    return table


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.render is not None:
        return render_saved(args.render)
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
    table = measure_all(dataset, args, argv)
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

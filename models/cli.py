"""`python -m models train | evaluate | publish-features` (contract: docs/design.md)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.dataset import DataError
from models.options import add_options, given_options
from models.redis_keys import DEFAULT_HISTORY_CAP, DEFAULT_PREFIX
from models.tower_config import TowerConfig
from models.train_config import PRESETS, TrainConfig

if TYPE_CHECKING:
    from models.splits import Split

log = logging.getLogger("models")


def _preset_note(path: str) -> str:
    """The sequential tower's own default of a field, where it has one."""
    value = PRESETS["sequence"].get(path)
    return "" if value is None else f"; sequence tower: {value}"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer >= 1")
    return value


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The training options: one per `TrainConfig` field."""
    add_options(p.add_argument_group("training"), TrainConfig, note=_preset_note)


def add_tower_args(p: argparse.ArgumentParser) -> None:
    """The architecture options: one per `TowerConfig` field."""
    group = p.add_argument_group("architecture")
    add_options(group, TowerConfig, prefix="tower.", note=_preset_note)


def train_config(args: argparse.Namespace, split: str | None = None) -> TrainConfig:
    """The options given, over the defaults of the user tower asked for (none asked: the
    default of `split`'s protocol; by default `args.split`)."""
    split = split if split is not None else getattr(args, "split", None)
    return TrainConfig.create(split, **given_options(args, TrainConfig))


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    root.add_argument("-v", "--verbose", action="store_true")
    sub = root.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train, evaluate on the split, export a bundle")
    t.add_argument(
        "--data", required=True, help="synthetic[:...] | ml-1m:DIR | ml-100k:DIR | csv:DIR"
    )
    t.add_argument(
        "--out", type=Path, default=Path("artifacts"), help="MODEL_DIR to export into (artifacts)"
    )
    t.add_argument(
        "--split",
        default="last-10pct",
        help="seed-2003 | last-10pct (the default; the field tower trains by default) | "
        "leave-last-n:N (the sequential tower) | none",
    )
    t.add_argument("--baselines", action="store_true", help="also evaluate the baselines")
    t.add_argument("--json", type=Path, help="write the evaluation report here")
    add_train_args(t)
    add_tower_args(t)

    e = sub.add_parser("evaluate", help="evaluate a bundle and/or the baselines on a split")
    e.add_argument("--data", required=True)
    e.add_argument("--split", required=True)
    e.add_argument("--bundle", type=Path, help="a bundle version directory")
    e.add_argument("--baselines", action="store_true")
    e.add_argument("--include-seen", action="store_true", help="do not exclude seen items")
    e.add_argument(
        "--history-cap",
        type=_positive,
        help="score the bundle as the service does under HISTORY_CAP=N: each user's tower "
        "reads the newest N history items at most (seen items are still all excluded)",
    )
    e.add_argument(
        "--any-split",
        action="store_true",
        help="evaluate the bundle even on a split other than the one it was trained on",
    )
    e.add_argument("--json", type=Path)

    p = sub.add_parser("publish-features", help="write user features and histories to Redis")
    p.add_argument("--data", required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument(
        "--redis-cluster",
        action="store_true",
        help="--redis-url names any node of a Redis Cluster (as REDIS_CLUSTER=true)",
    )
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"key prefix ({DEFAULT_PREFIX})")
    p.add_argument(
        "--history-length",
        type=_positive,
        default=DEFAULT_HISTORY_CAP,
        help="newest items kept per user (as the service's HISTORY_CAP, whose default it is)",
    )
    p.add_argument("--ttl", type=_positive, default=None, help="key TTL in seconds (default: none)")
    return root


def _write_report(report: dict, path: Path | None) -> None:
    from models.report import format_table

    print(format_table(report), file=sys.stderr)
    if path is not None:
        path.write_text(json.dumps(report, indent=2))


def _check_outputs(out: Path | None, report: Path | None) -> None:
    """Refuse outputs that cannot be written before any work, not after a training run."""
    if out is not None:
        # The nearest existing folder on the way to it: a file there blocks the export.
        existing = next(p for p in (out, *out.parents) if p.exists())
        if not existing.is_dir():
            raise DataError(f"--out {out}: {existing} exists and is not a directory")
    if report is not None and report.is_dir():
        raise DataError(f"--json {report} is a directory")
    if report is not None and not report.parent.is_dir():
        raise DataError(f"--json {report}: no directory {report.parent}")


def cmd_train(args: argparse.Namespace) -> int:
    from models.pipeline import run_training
    from models.sources import load_dataset
    from models.splits import split_name

    config = train_config(args)
    if args.split != "none":  # as run_training reads it
        try:
            split_name(args.split)  # refused before the data loads
        except ValueError as error:  # train also takes `none`, which no evaluation does
            raise ValueError(f"{error}, or 'none' (train on everything)") from None
    elif args.baselines:
        raise DataError("--baselines needs a held-out part to measure on; --split none has none")
    _check_outputs(args.out, args.json)
    run = run_training(
        load_dataset(args.data), args.split, config, args.out, baselines=args.baselines
    )
    if not run.main:  # a data-parallel process other than rank 0: it only trained
        return 0
    if run.report is not None:
        _write_report(run.report, args.json)
    elif args.json is not None:
        print(f"--split none has no held-out part: nothing written to {args.json}", file=sys.stderr)
    print(run.bundle)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from models.baselines import check_dense_fits
    from models.evaluation import evaluate_recommender, run_baselines
    from models.recommender import BundleRecommender
    from models.report import report_json
    from models.sources import load_dataset
    from models.splits import make_split, split_name

    if args.bundle is None and not args.baselines:
        raise DataError("nothing to evaluate: give --bundle PATH and/or --baselines")
    if args.bundle is None and (args.history_cap is not None or args.any_split):
        raise DataError("--history-cap and --any-split apply to a --bundle")
    _check_outputs(None, args.json)
    split_name(args.split)  # refused before the data loads
    if args.bundle is not None and not args.bundle.is_dir():  # verified in full once loaded
        raise DataError(f"--bundle {args.bundle}: no such bundle directory")
    dataset = load_dataset(args.data)
    if args.baselines:
        check_dense_fits(len(dataset.items), "--baselines")
    split = make_split(dataset.interactions, args.split)
    item_index = dataset.item_index()
    exclude_seen = not args.include_seen
    results = {}
    if args.bundle is not None:
        rec = BundleRecommender(args.bundle, dataset.users, item_index, args.history_cap)
        if not args.any_split:
            check_trained_on(rec.manifest, split)
        rec.fit(split.train, item_index)
        results["two_tower"] = evaluate_recommender(
            rec, split.train, split.test, item_index, exclude_seen=exclude_seen
        )
    if args.baselines:
        results |= run_baselines(split.train, split.test, item_index, exclude_seen)
    report = report_json(split.name, split.test, results)
    if args.history_cap is not None:
        report["history_cap"] = args.history_cap
    _write_report(report, args.json)
    return 0


def check_trained_on(manifest: Mapping[str, Any], split: Split) -> None:
    """A bundle is only measured fairly on the split it was trained on: another split's test
    period may lie inside its training data (and its prior's counts)."""
    from models.splits import fingerprint

    data = manifest.get("data") or {}
    trained_on, n_train = data.get("split"), data.get("n_train_interactions")
    if trained_on != split.name or n_train != len(split.train):
        why = f"not on split {split.name!r} of this data ({len(split.train)})"
    elif data.get("train_fingerprint") not in (None, fingerprint(split.train)):  # None: older
        why = f"not on this data's split {split.name!r}: the training rows differ"
    else:
        return
    raise DataError(
        f"the bundle was trained on split {trained_on!r} of {data.get('source')!r} "
        f"({n_train} training interactions), {why}: the test period may be in its training "
        "data; evaluate it on its own split (`evaluate --any-split` scores it anyway)"
    )


def cmd_publish(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisClusterException, RedisError

    from models.online_store import connect, publish, redacted
    from models.redis_keys import check_prefix
    from models.sources import load_dataset

    check_prefix(args.prefix)
    client = connect(args.redis_url, cluster=args.redis_cluster)
    try:
        n = publish(
            client,
            load_dataset(args.data),
            prefix=args.prefix,
            history_length=args.history_length,
            ttl_seconds=args.ttl,
        )
    except (RedisError, RedisClusterException) as exc:  # out of memory, a slot moving...
        raise DataError(
            f"Redis refused a write ({exc}); the users written before it are published, the "
            "others keep what they had: publish again once it accepts writes"
        ) from exc
    finally:
        client.close()
    print(f"published features and histories of {n} users to {redacted(args.redis_url)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "publish-features": cmd_publish}
    from models.distributed import end_process, leave_world

    try:
        code = commands[args.command](args)
    except (DataError, ValueError, OSError) as exc:  # a clear line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    finally:
        distributed = leave_world()
    if distributed:
        end_process(code)
    return code

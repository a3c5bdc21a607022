"""`python -m models train | evaluate | publish-features` (contract: DESIGN.md)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from models.dataset import DataError
from models.tower_config import UserTowerName
from models.towers import HISTORY_ENCODERS, TowerConfig
from models.train_config import HistoryMode, NegativesName, TrainConfig

if TYPE_CHECKING:
    from models.splits import Split

log = logging.getLogger("models")


def add_tower_args(p: argparse.ArgumentParser) -> None:
    d = TowerConfig()
    g = p.add_argument_group("architecture")
    g.add_argument("--field-dim", type=int, default=d.field_dim)
    g.add_argument(
        "--hidden", default=",".join(map(str, d.hidden)), help="MLP widths, e.g. 256,128"
    )
    g.add_argument("--out-dim", type=int, default=d.out_dim, help="bundle embedding dimension")
    g.add_argument("--senet", action="store_true", help="SENet feature gating before the MLP")
    g.add_argument("--history-encoder", choices=sorted(HISTORY_ENCODERS), default=d.history_encoder)
    g.add_argument("--dropout", type=float, default=d.dropout)
    g.add_argument(
        "--user-tower",
        choices=list(get_args(UserTowerName)),
        default=d.user_tower,
        help="fields: features and the pooled history through an MLP, one example per "
        "interaction; sequence: a causal transformer over the history, every position "
        "trained to predict the next item",
    )
    g.add_argument("--blocks", type=int, default=d.blocks, help="sequence tower: blocks")
    g.add_argument("--heads", type=int, default=d.heads, help="sequence tower: attention heads")


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--loss", choices=["softmax", "bce", "hinge", "logistic"], default=d.loss)
    g.add_argument("--negatives", choices=list(get_args(NegativesName)), default=d.negatives)
    g.add_argument(
        "--num-negatives",
        type=int,
        default=d.num_negatives,
        help="sampled negatives (0: 1024 shared by a batch for the softmax, 1 per example for "
        "the other losses)",
    )
    g.add_argument(
        "--hard-negatives",
        type=int,
        default=d.hard_negatives,
        help="sequence tower, sampled negatives: per user, the K items the model ranks highest "
        "that the user did not take, mined again every epoch (0: off)",
    )
    g.add_argument(
        "--no-logq",
        dest="logq_correction",
        action="store_false",
        help="disable logQ correction of the softmax",
    )
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--history-length", type=int, default=d.history_length)
    g.add_argument(
        "--popularity-prior",
        type=float,
        default=d.popularity_prior,
        help="weight of log1p(item count) added to scores at retrieval (0: off; default: "
        "chosen on the validation slice)",
    )
    g.add_argument(
        "--prior-half-life",
        type=float,
        default=d.prior_half_life_days,
        help="days: the prior counts recent interactions more (0: all alike; default: chosen "
        "with the prior's weight on the validation slice)",
    )
    g.add_argument(
        "--target-window",
        type=int,
        default=d.target_window,
        help="draw each positive from the user's next N events (1: next item)",
    )
    g.add_argument(
        "--history-mode",
        choices=list(get_args(HistoryMode)),
        default=d.history_mode,
        help="before: the items strictly before each example (next-item training); latest: "
        "the user's latest items at the end of the log minus the positive (what serving reads)",
    )
    g.add_argument(
        "--history-dropout",
        type=float,
        default=d.history_dropout,
        help="share of history items hidden at random in each training example",
    )
    g.add_argument(
        "--mask-seen-negatives",
        action=argparse.BooleanOptionalAction,
        default=d.mask_seen_negatives,
        help="softmax: never use an item the user interacted with as their negative",
    )
    g.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        default=d.refit,
        help="after early stopping, retrain on the whole training period for the best epochs",
    )
    g.add_argument(
        "--distill-weight",
        type=float,
        default=d.distill_weight,
        help="weight of distillation from an EASE teacher fitted on the training log (0: off; "
        "small catalogues: the student scores the whole catalogue every step)",
    )
    g.add_argument(
        "--distill-temperature",
        type=float,
        default=d.distill_temperature,
        help="softmax temperature of the teacher's standardised scores",
    )
    g.add_argument(
        "--distill-top-k",
        type=int,
        default=d.distill_top_k,
        help="teacher items kept as soft targets per user",
    )
    g.add_argument(
        "--user-balance",
        type=float,
        default=d.user_balance,
        help="draw examples with probability ~ (user's interaction count)^-B: 0 every "
        "interaction alike (heavy users dominate), 1 every user alike",
    )
    g.add_argument("--patience", type=int, default=d.patience, help="0: every epoch, keep the best")
    g.add_argument(
        "--validation-fraction",
        type=float,
        default=d.validation_fraction,
        help="0: no validation (no early stopping, no prior search, no refit)",
    )
    g.add_argument(
        "--validation-metric",
        choices=["recall@50", "pooled_recall@50", "recall@10", "ndcg@10", "ndcg@50"],
        default=d.validation_metric,
        help="what early stopping and the prior's search maximise on the validation slice "
        "(recall: mean over users; pooled: total hits / total relevant items)",
    )
    g.add_argument(
        "--validation-min-gap",
        type=float,
        default=d.validation_min_gap_days,
        help="days: validate only on returning users, whose first validation interaction comes "
        "at least this long after their last earlier one (0: every user)",
    )
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu, cuda:0...")


def train_config(args: argparse.Namespace) -> TrainConfig:
    tower = TowerConfig(
        field_dim=args.field_dim,
        hidden=tuple(int(w) for w in args.hidden.split(",") if w),
        out_dim=args.out_dim,
        senet=args.senet,
        history_encoder=args.history_encoder,
        dropout=args.dropout,
        user_tower=args.user_tower,
        blocks=args.blocks,
        heads=args.heads,
    )
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        loss=args.loss,
        negatives=args.negatives,
        num_negatives=args.num_negatives,
        hard_negatives=args.hard_negatives,
        logq_correction=args.logq_correction,
        temperature=args.temperature,
        history_length=args.history_length,
        tower=tower,
        popularity_prior=args.popularity_prior,
        target_window=args.target_window,
        history_mode=args.history_mode,
        history_dropout=args.history_dropout,
        mask_seen_negatives=args.mask_seen_negatives,
        refit=args.refit,
        distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature,
        distill_top_k=args.distill_top_k,
        user_balance=args.user_balance,
        prior_half_life_days=args.prior_half_life,
        patience=args.patience,
        validation_fraction=args.validation_fraction,
        validation_min_gap_days=args.validation_min_gap,
        validation_metric=args.validation_metric,
        seed=args.seed,
        device=args.device,
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    root.add_argument("-v", "--verbose", action="store_true")
    sub = root.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train, evaluate on the split, export a bundle")
    t.add_argument(
        "--data", required=True, help="synthetic[:...] | ml-1m:DIR | ml-100k:DIR | csv:DIR"
    )
    t.add_argument("--out", type=Path, default=Path("artifacts"))
    t.add_argument(
        "--split", default="last-10pct", help="seed-2003 | last-10pct | leave-last-n:N | none"
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
    p.add_argument("--prefix", default="tr")
    p.add_argument("--history-length", type=int, default=100)
    p.add_argument("--ttl", type=int, default=None, help="key TTL in seconds (default: none)")
    return root


def _write_report(report: dict, path: Path | None) -> None:
    from models.evaluation import format_table

    print(format_table(report), file=sys.stderr)
    if path is not None:
        path.write_text(json.dumps(report, indent=2))


def _check_outputs(out: Path | None, report: Path | None) -> None:
    """Refuse outputs that cannot be written before any work, not after a training run."""
    if out is not None and out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if report is not None and not report.parent.is_dir():
        raise DataError(f"--json {report}: no directory {report.parent}")


def cmd_train(args: argparse.Namespace) -> int:
    from models.pipeline import run_training
    from models.sources import load_dataset

    config = train_config(args)
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
    from models.evaluation import evaluate_recommender, report_json, run_baselines
    from models.recommender import BundleRecommender
    from models.sources import load_dataset
    from models.splits import make_split

    if args.bundle is None and not args.baselines:
        raise DataError("nothing to evaluate: give --bundle PATH and/or --baselines")
    _check_outputs(None, args.json)
    dataset = load_dataset(args.data)
    if args.baselines:
        check_dense_fits(len(dataset.items), "--baselines")
    split = make_split(dataset.interactions, args.split)
    item_index = {str(i): r for r, i in enumerate(dataset.items.index)}
    exclude_seen = not args.include_seen
    results = {}
    if args.bundle is not None:
        rec = BundleRecommender(args.bundle, dataset.users, item_index)
        if not args.any_split:
            _check_trained_on(rec.manifest, split)
        rec.fit(split.train, item_index)
        results["two_tower"] = evaluate_recommender(
            rec, split.train, split.test, item_index, exclude_seen=exclude_seen
        )
    if args.baselines:
        results |= run_baselines(split.train, split.test, item_index, exclude_seen)
    _write_report(report_json(split.name, split.test, results), args.json)
    return 0


def _check_trained_on(manifest: Mapping[str, Any], split: Split) -> None:
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
        "data; evaluate it on its own split, or pass --any-split"
    )


def cmd_publish(args: argparse.Namespace) -> int:
    from models.online_store import check_prefix, connect, publish
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
    finally:
        client.close()
    print(f"published features and histories of {n} users to {args.redis_url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "publish-features": cmd_publish}
    try:
        return commands[args.command](args)
    except (DataError, ValueError, OSError) as exc:  # a clear line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        from models.distributed import leave_world

        leave_world()

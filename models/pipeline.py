"""`train` end to end: split -> validation carve -> train with early stopping -> held-out
evaluation -> bundle export."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from models.baselines import check_dense_fits
from models.dataset import Dataset
from models.distributed import join_world
from models.evaluation import (
    EvalResult,
    evaluate_recommender,
    measurable_sets,
    run_baselines,
)
from models.export import export_bundle
from models.item_attributes import ItemAttributes
from models.recommender import TwoTowerRecommender
from models.report import report_json
from models.splits import (
    Split,
    make_split,
)
from models.train import Trainer
from models.train_config import TrainConfig
from models.trained import TrainedModel
from models.validation import Validator, carve_validation, validated

log = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """What `run_training` produced."""

    trained: TrainedModel
    split: Split | None
    results: dict[str, EvalResult]
    report: dict[str, Any] | None
    bundle: Path | None
    validation: dict[str, float] | None = None
    main: bool = True  # False: a data-parallel process other than rank 0, which only trained


def refit(dataset: Dataset, train: pd.DataFrame, trained: TrainedModel) -> TrainedModel:
    """Train again from scratch on the whole training period (validation slice included),
    for the epochs and with the prior that validation chose: the model also learns from the
    most recent behaviour, which on a time split is the closest to what comes next."""
    chosen = dataclasses.replace(
        trained.config,
        epochs=trained.best_epoch,
        patience=0,
        popularity_prior=trained.prior_weight,
        prior_half_life_days=trained.prior_half_life_days,
    )
    again = Trainer(dataset, train, chosen, None).fit()
    # Keep the record of the validated run (its history and best epoch), not the refit's.
    again.config, again.history, again.best_epoch = (
        trained.config,
        trained.history,
        trained.best_epoch,
    )
    return again


def run_training(
    dataset: Dataset,
    split_spec: str,
    config: TrainConfig,
    out: Path | None,
    *,
    baselines: bool = False,
) -> TrainingRun:
    """Train on the split's training part, evaluate on its test part, export to `out`.

    Args:
        dataset: loaded source.
        split_spec: a split name (`models.splits`) or `none` (train on everything).
        config: training settings.
        out: artifacts directory; None skips the export (benchmarks).
        baselines: also evaluate the classic baselines on the same split.

    Under `torchrun` every process trains (`models.distributed`); only rank 0 chooses the
    prior, evaluates and exports, and the others return with no report and no bundle.
    """
    if baselines and split_spec != "none":
        check_dense_fits(len(dataset.items), "--baselines")
    split = None if split_spec == "none" else make_split(dataset.interactions, split_spec)
    train = dataset.interactions if split is None else split.train
    item_index = dataset.item_index()
    if split is not None:  # the evaluation after training must have something to measure
        measurable_sets(train, split.test, item_index)
    trained, prior_search, validation = _train(dataset, train, config, split_spec)
    if not join_world(config.resolved_device()).is_main:
        return TrainingRun(trained, split, {}, None, None, main=False)

    rec = TwoTowerRecommender(trained, dataset.users)
    rec.fit(train, item_index)
    results: dict[str, EvalResult] = {}
    report = None
    if split is not None:
        results["two_tower"] = evaluate_recommender(rec, train, split.test, item_index)
        if baselines:
            results |= run_baselines(train, split.test, item_index)
        report = report_json(split.name, split.test, results)
    bundle = None
    if out is not None:
        record = {"prior_search": prior_search, "validation": validation, "evaluation": report}
        bundle = _export(dataset, split, trained, rec, out, record)
    return TrainingRun(trained, split, results, report, bundle, validation)


def _export(
    dataset: Dataset,
    split: Split | None,
    trained: TrainedModel,
    rec: TwoTowerRecommender,
    out: Path,
    record: dict[str, Any],
) -> Path:
    """The bundle of `trained` under `out`, its manifest the run's record (`record`: the
    prior's search, the chosen validation metrics, the evaluation report)."""
    config = trained.config
    metadata = {
        "model": {"class": "TwoTower", **dataclasses.asdict(config.tower)},
        "training": {
            **{k: v for k, v in dataclasses.asdict(config).items() if k != "tower"},
            "best_epoch": trained.best_epoch,
            "popularity_prior_chosen": trained.prior_weight,
            "prior_half_life_days_chosen": trained.prior_half_life_days,
            "popularity_prior_search": record["prior_search"],
            "validation": record["validation"],
            "history": trained.history,
        },
        "data": dataset.summary() | (split.summary() if split else {"split": "none"}),
        "evaluation": record["evaluation"],
        "item_features": trained.item_encoder.to_json(),
    }
    sample_users = [*rec.known_users[:256], "__cold_start_user__"]
    attributes = ItemAttributes.from_frame(dataset.items, dataset.item_columns, trained.item_ids)
    return export_bundle(
        trained,
        out,
        rec.item_matrix,
        rec.user_inputs(sample_users),
        metadata,
        item_attributes=attributes,
    )


def _train(
    dataset: Dataset, train: pd.DataFrame, config: TrainConfig, split_spec: str
) -> tuple[TrainedModel, dict[str, float] | None, dict[str, float] | None]:
    """The model, trained with early stopping on a validation slice carved from `train`
    (unless `validation_fraction` is 0), its prior chosen there, refitted on the whole of
    `train` if asked; with the prior's search and the chosen validation metrics."""
    validate = None
    fit_part = train
    if config.validation_fraction > 0:
        carve = carve_validation(train, config, split_spec)
        fit_part = carve.train
        validate = Validator(dataset, carve.train, carve.test, config.seed)
    trained = Trainer(dataset, fit_part, config, validate).fit()
    if validate is None:
        return trained, None, None
    # Rank 0 chooses; every process refits with its choice (the same everywhere).
    world = join_world(config.resolved_device())
    prior_search, validation, *prior = world.from_main(partial(validated, trained, validate))
    trained.prior_weight, trained.prior_half_life_days = prior
    if config.refit:
        trained = refit(dataset, train, trained)
    return trained, prior_search, validation

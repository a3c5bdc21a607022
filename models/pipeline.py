"""`train` end to end: split -> validation carve -> train with early stopping -> held-out
evaluation -> bundle export."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.baselines import check_dense_fits
from models.dataset import Dataset
from models.distributed import join_world
from models.evaluation import (
    EvalResult,
    evaluate_recommender,
    measurable_sets,
    report_json,
    run_baselines,
)
from models.export import export_bundle
from models.recommender import TwoTowerRecommender
from models.splits import NoReturningUsersError, Split, make_split, validation_split
from models.train import (
    PRIOR_GRID,
    PRIOR_HALF_LIVES,
    TrainedModel,
    Trainer,
    ValidateFn,
)
from models.train_config import TrainConfig

log = logging.getLogger(__name__)

# Validation runs every epoch: a sample of users keeps it cheap and still stable.
MAX_VALIDATION_USERS = 3000


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


def _sample_users(test: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    users = test["user_id"].unique()
    if len(users) <= n:
        return test
    keep = np.random.default_rng(seed).choice(users, size=n, replace=False)
    return test[test["user_id"].isin(keep)]


def carve_validation(train: pd.DataFrame, config: TrainConfig) -> Split:
    """The validation slice of `config`; every user of it when none is a returning user
    (logged: short or compressed logs), rather than no validation at all."""
    try:
        return validation_split(train, config.validation_fraction, config.validation_min_gap_days)
    except NoReturningUsersError as exc:
        log.warning("%s: validating on every user of the slice instead", exc)
        return validation_split(train, config.validation_fraction)


def make_validator(
    dataset: Dataset, fit_part: pd.DataFrame, validation: pd.DataFrame, seed: int
) -> ValidateFn:
    """Validation metrics of a model trained on `fit_part`, on the period right after it."""
    sample = _sample_users(validation, MAX_VALIDATION_USERS, seed)
    item_index = {str(i): r for r, i in enumerate(dataset.items.index)}
    measurable_sets(fit_part, sample, item_index, part="validation slice (--validation-fraction)")

    def validate(trained: TrainedModel) -> dict[str, float]:
        rec = TwoTowerRecommender(trained, dataset.users)
        rec.fit(fit_part, item_index)
        result = evaluate_recommender(rec, fit_part, sample, item_index, ks=(10, 50))
        return dict(result.means) | {"pooled_recall@50": result.pooled_recall(50)}

    return validate


def choose_prior_weight(
    trained: TrainedModel, validate: ValidateFn, metric: str
) -> dict[str, float]:
    """Set `trained.prior_weight` (from `PRIOR_GRID`) and, unless the config fixes it,
    `trained.prior_half_life_days` (from `PRIOR_HALF_LIVES`) to the pair that validates best.

    Only the scoring changes (the towers are trained once), so the search costs a few
    validation passes. Returns the validation metric of every pair tried, keyed
    `"{weight}"` (no decay) or `"{weight}@{half-life}d"`.
    """
    fixed = trained.config.prior_half_life_days
    half_lives = PRIOR_HALF_LIVES if fixed is None else (fixed,)
    pairs = [(0.0, 0.0)] + [(w, h) for w in PRIOR_GRID if w for h in half_lives]
    scores: dict[str, float] = {}
    best, best_score = pairs[0], -np.inf
    for weight, half_life in pairs:
        trained.prior_weight, trained.prior_half_life_days = weight, half_life
        key = f"{weight}@{half_life:g}d" if half_life else str(weight)
        scores[key] = validate(trained)[metric]
        if scores[key] > best_score:
            best, best_score = (weight, half_life), scores[key]
    trained.prior_weight, trained.prior_half_life_days = best
    log.info("popularity prior %s, half-life %s d (validation %s: %s)", *best, metric, scores)
    return scores


def _validated(
    trained: TrainedModel, validate: ValidateFn
) -> tuple[dict[str, float] | None, dict[str, float], float, float]:
    """The prior's search (unless the config fixes the weight), the final validation metrics
    and the chosen (weight, half-life)."""
    search = None
    if trained.config.popularity_prior is None:
        search = choose_prior_weight(trained, validate, trained.config.validation_metric)
    return search, validate(trained), trained.prior_weight, trained.prior_half_life_days


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
    item_index = {str(i): r for r, i in enumerate(dataset.items.index)}
    if split is not None:  # the evaluation after training must have something to measure
        measurable_sets(train, split.test, item_index)
    validate = None
    fit_part = train
    if config.validation_fraction > 0:
        carve = carve_validation(train, config)
        fit_part = carve.train
        validate = make_validator(dataset, carve.train, carve.test, config.seed)
    trained = Trainer(dataset, fit_part, config, validate).fit()
    world = join_world(config.resolved_device())
    prior_search = None
    validation = None
    if validate is not None:
        # Rank 0 chooses; every process refits with its choice (the same everywhere).
        prior_search, validation, *prior = world.from_main(partial(_validated, trained, validate))
        trained.prior_weight, trained.prior_half_life_days = prior
    if config.refit and validate is not None:
        trained = refit(dataset, train, trained)
    if not world.is_main:
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
        sample_users = [*rec.known_users[:256], "__cold_start_user__"]
        metadata = {
            "model": {"class": "TwoTower", **dataclasses.asdict(config.tower)},
            "training": {
                **{k: v for k, v in dataclasses.asdict(config).items() if k != "tower"},
                "best_epoch": trained.best_epoch,
                "popularity_prior_chosen": trained.prior_weight,
                "prior_half_life_days_chosen": trained.prior_half_life_days,
                "popularity_prior_search": prior_search,
                "validation": validation,
                "history": trained.history,
            },
            "data": dataset.summary() | (split.summary() if split else {"split": "none"}),
            "evaluation": report,
            "item_features": trained.item_encoder.to_json(),
        }
        bundle = export_bundle(
            trained, out, rec.item_matrix, rec.user_inputs(sample_users), metadata
        )
    return TrainingRun(trained, split, results, report, bundle, validation)

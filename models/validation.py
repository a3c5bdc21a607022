"""Validation: the slice carved from the training part, the metrics of a model on it
each epoch, and the popularity prior's choice. Nothing here sees a test split."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from models.baselines import UserItems
from models.dataset import Dataset
from models.evaluation import EvalResult, measurable_sets
from models.metrics import means, per_user_metrics
from models.popularity_prior import PRIOR_GRID, PRIOR_HALF_LIVES
from models.recommender import TwoTowerRecommender
from models.splits import NoReturningUsersError, Split, is_next_item, make_split, validation_split
from models.train import ValidateFn
from models.train_config import TrainConfig
from models.trained import TrainedModel

log = logging.getLogger(__name__)

# Validation runs every epoch: a sample of users keeps it cheap and still stable.
MAX_VALIDATION_USERS = 3000


def _sample_users(test: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    users = test["user_id"].unique()
    if len(users) <= n:
        return test
    keep = np.random.default_rng(seed).choice(users, size=n, replace=False)
    return test[test["user_id"].isin(keep)]


def carve_validation(train: pd.DataFrame, config: TrainConfig, protocol: str = "none") -> Split:
    """The validation slice that fits the test protocol, carved from the training part.

    For `leave-last-n:N`, each training user's last N training interactions (next-item
    validation: the test items are never seen); otherwise the end of the training period,
    `config.validation_fraction` of it (`validation_split`), where every user of the slice
    is kept when none is a returning user (logged: short or compressed logs), rather than no
    validation at all.

    Raises:
        ValueError: the training part is too short to carve one from (said of it, not of the
            data as given).
    """
    try:
        return _carve(train, config, protocol)
    except ValueError as exc:
        raise ValueError(
            f"no validation slice in the training part ({exc}); --validation-fraction 0 "
            "trains without one"
        ) from None


def _carve(train: pd.DataFrame, config: TrainConfig, protocol: str) -> Split:
    if is_next_item(protocol):
        held_out = make_split(train, protocol)
        return Split("validation", held_out.train, held_out.test)
    try:
        return validation_split(train, config.validation_fraction, config.validation_min_gap_days)
    except NoReturningUsersError as exc:
        log.warning("%s: validating on every user of the slice instead", exc)
        return validation_split(train, config.validation_fraction)


class Validator:
    """Validation metrics of a model trained on `fit_part`, on the period right after it
    (a `ValidateFn`): `evaluate_recommender`'s metrics of the model as served (its prior
    folded in) on a sample of the validation users, plus `pooled_recall@50`.

    `search` gives them under many priors at the cost of one: the users and the catalogue
    are embedded once and ranked by `u.v + b` for every prior b in chunks of users
    (`TwoTowerRecommender.top_k_under_priors`), never a users x catalogue matrix at once.
    """

    KS = (10, 50)

    def __init__(
        self, dataset: Dataset, fit_part: pd.DataFrame, validation: pd.DataFrame, seed: int
    ) -> None:
        sample = _sample_users(validation, MAX_VALIDATION_USERS, seed)
        self.item_index = dataset.item_index()
        self.users, self.relevant = measurable_sets(
            fit_part, sample, self.item_index, part="validation slice (--validation-fraction)"
        )
        self.n_relevant = np.array([len(r) for r in self.relevant], dtype=np.int64)
        self.seen = UserItems.build(fit_part, self.item_index)
        self.user_table = dataset.users
        self.fit_part = fit_part

    def __call__(self, trained: TrainedModel) -> dict[str, float]:
        return self.search(trained, [(trained.prior_weight, trained.prior_half_life_days)])[0]

    def search(
        self, trained: TrainedModel, priors: Sequence[tuple[float, float]]
    ) -> list[dict[str, float]]:
        """The metrics under each `(weight, half-life)` prior, in order."""
        rec = TwoTowerRecommender(trained, self.user_table)
        rec.fit(self.fit_part, self.item_index)
        tops = rec.top_k_under_priors(self.users, priors, max(self.KS), self.seen)
        return [self._metrics(top) for top in tops]

    def _metrics(self, top: np.ndarray) -> dict[str, float]:
        per_user = per_user_metrics(top, self.relevant, self.KS)
        result = EvalResult(
            means=means(per_user),
            per_user=per_user,
            user_ids=tuple(self.users),
            n_relevant=self.n_relevant,
            eval_seconds=0.0,
        )
        return dict(result.means) | {"pooled_recall@50": result.pooled_recall(50)}


def _prior_metrics(
    trained: TrainedModel, validate: ValidateFn, priors: Sequence[tuple[float, float]]
) -> list[dict[str, float]]:
    """`validate`'s metrics of `trained` under each prior: one `Validator.search`, or one
    call per prior of any other validate function."""
    if isinstance(validate, Validator):
        return validate.search(trained, priors)
    kept = trained.prior_weight, trained.prior_half_life_days
    metrics = []
    for weight, half_life in priors:
        trained.prior_weight, trained.prior_half_life_days = weight, half_life
        metrics.append(validate(trained))
    trained.prior_weight, trained.prior_half_life_days = kept
    return metrics


def _search_prior(
    trained: TrainedModel, validate: ValidateFn, metric: str
) -> tuple[dict[str, float], dict[str, float]]:
    """`choose_prior_weight`, also returning the chosen pair's validation metrics."""
    fixed = trained.config.prior_half_life_days
    half_lives = PRIOR_HALF_LIVES if fixed is None else (fixed,)
    pairs = [(0.0, 0.0)] + [(w, h) for w in PRIOR_GRID if w for h in half_lives]
    results = _prior_metrics(trained, validate, pairs)
    scores = {
        f"{weight}@{half_life:g}d" if half_life else str(weight): result[metric]
        for (weight, half_life), result in zip(pairs, results, strict=True)
    }
    best = int(np.argmax(list(scores.values())))  # the first of equals
    trained.prior_weight, trained.prior_half_life_days = pairs[best]
    log.info(
        "popularity prior %s, half-life %s d (validation %s: %s)", *pairs[best], metric, scores
    )
    return scores, results[best]


def choose_prior_weight(
    trained: TrainedModel, validate: ValidateFn, metric: str
) -> dict[str, float]:
    """Set `trained.prior_weight` (from `PRIOR_GRID`) and, unless the config fixes it,
    `trained.prior_half_life_days` (from `PRIOR_HALF_LIVES`) to the pair that validates best.

    Only the scoring changes (the towers are trained once), so a `Validator` scores the
    users and items once and ranks them under every pair (`Validator.search`); any other
    validate function is called once per pair. Returns the validation metric of every pair
    tried, keyed `"{weight}"` (no decay) or `"{weight}@{half-life}d"`.
    """
    return _search_prior(trained, validate, metric)[0]


def validated(
    trained: TrainedModel, validate: ValidateFn
) -> tuple[dict[str, float] | None, dict[str, float], float, float]:
    """The prior's search (unless the config fixes the weight), the final validation metrics
    and the chosen (weight, half-life)."""
    if trained.config.popularity_prior is None:
        search, chosen = _search_prior(trained, validate, trained.config.validation_metric)
        return search, chosen, trained.prior_weight, trained.prior_half_life_days
    return None, validate(trained), trained.prior_weight, trained.prior_half_life_days

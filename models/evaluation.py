"""Offline evaluation: rank the catalogue for each test user and score the top-K.

Protocol. A test user's relevant set is their distinct test items; with `exclude_seen` the
items they interacted with in train are removed from it and masked out of the ranking
(score -inf), and users left with no relevant item are skipped. Test items missing from the
catalogue index stay in the relevant set: no model can retrieve them, so they count as
misses rather than silently inflating recall.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import pandas as pd

from models.baselines import BASELINES, UserItems
from models.dataset import DataError
from models.metrics import (
    CI_RESAMPLES,
    CI_SEED,
    DEFAULT_KS,
    bootstrap_cis,
    bootstrap_pooled_ci,
    means,
    per_user_metrics,
)

# Scores held at once when ranking a catalogue for many users (64 MB of float32): a large
# catalogue is ranked for fewer users at a time (`SCORE_CHUNK // n_items`, at least one).
SCORE_CHUNK = 1 << 24


class Scorer(Protocol):
    """The part of a recommender the evaluator uses: a fitted model's `score`."""

    def score(self, user_ids: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one model on one split.

    Attributes:
        means: `{"recall@K" | "hit_rate@K" | "ndcg@K": mean over evaluated users}`.
        per_user: the same keys, float64 [n_users] each, row order of `user_ids`.
        user_ids: the evaluated users.
        n_relevant: int64 [n_users], size of each user's relevant set.
        eval_seconds: wall time of scoring and ranking.
        fit_seconds: wall time of fitting, when the caller measured it (0 otherwise).
    """

    means: dict[str, float]
    per_user: dict[str, np.ndarray]
    user_ids: tuple[str, ...]
    n_relevant: np.ndarray
    eval_seconds: float
    fit_seconds: float = 0.0

    def ci(
        self, metric: str, n: int = CI_RESAMPLES, seed: int = CI_SEED, alpha: float = 0.05
    ) -> tuple[float, float]:
        """Bootstrap confidence interval of `means[metric]` (resampling users): the bounds
        `intervals` and the report give it, to the last bit."""
        if metric not in self.per_user:
            raise KeyError(f"no metric {metric!r}; known: {list(self.per_user)}")
        return self.intervals(n=n, seed=seed, alpha=alpha)[metric]

    def intervals(
        self, n: int = CI_RESAMPLES, seed: int = CI_SEED, alpha: float = 0.05
    ) -> dict[str, tuple[float, float]]:
        """`ci` of every metric of `means`, all from one set of resamples of the users."""
        return bootstrap_cis(self.per_user, n=n, seed=seed, alpha=alpha)

    def pooled_recall(self, k: int) -> float:
        """Total hits over total relevant items (micro average): heavy users weigh more.

        `means["recall@K"]` averages per user instead; the two differ most when a few users
        hold most of the test interactions, as in a time split.
        """
        total = int(self.n_relevant.sum())
        hits = float((self.per_user[f"recall@{k}"] * self.n_relevant).sum())
        return hits / total if total else 0.0

    def pooled_recall_ci(
        self, k: int, n: int = CI_RESAMPLES, seed: int = CI_SEED, alpha: float = 0.05
    ) -> tuple[float, float]:
        """Bootstrap confidence interval of `pooled_recall(k)`: each resample of the users
        recomputes total hits over total relevant (same draws as `ci` for the same seed)."""
        hits = self.per_user[f"recall@{k}"] * self.n_relevant
        return bootstrap_pooled_ci(hits, self.n_relevant, n=n, seed=seed, alpha=alpha)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k highest scores, best first; -1 (padding, never a hit) where
    the score is -inf: an item excluded, or one the model cannot score.

    Args:
        scores: float [B, n_items].
        k: list length; clipped to n_items.

    Returns:
        int64 [B, min(k, n_items)].
    """
    k = min(k, scores.shape[1])
    if k <= 0:
        return np.empty((scores.shape[0], 0), dtype=np.int64)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1).astype(np.int64)
    top[np.take_along_axis(scores, top, axis=1) == -np.inf] = -1
    return top


def measurable_sets(
    train: pd.DataFrame,
    test: pd.DataFrame,
    item_index: Mapping[str, int],
    exclude_seen: bool = True,
    part: str = "test part",
) -> tuple[list[str], list[np.ndarray]]:
    """`relevant_sets`, refusing a `part` with no user to measure: every metric would read
    0.0 ("nothing to measure" is not "scored zero"). Callers check up front, before training."""
    users, relevant = relevant_sets(train, test, item_index, exclude_seen)
    if not users:
        unseen = " not seen in training" if exclude_seen else ""
        raise DataError(f"the {part} has no user with an item{unseen} to find: nothing to measure")
    return users, relevant


def relevant_sets(
    train: pd.DataFrame,
    test: pd.DataFrame,
    item_index: Mapping[str, int],
    exclude_seen: bool = True,
) -> tuple[list[str], list[np.ndarray]]:
    """Each test user's relevant item indices.

    Returns:
        (users sorted by id, int64 arrays of distinct item indices, -1 for every distinct
        test item outside the catalogue). Users with an empty set are left out.
    """
    pairs = test[["user_id", "item_id"]].drop_duplicates()
    if exclude_seen:
        seen = train[["user_id", "item_id"]].drop_duplicates()
        flagged = pairs.merge(seen, how="left", on=["user_id", "item_id"], indicator=True)
        pairs = flagged.loc[flagged["_merge"] == "left_only", ["user_id", "item_id"]]
    pairs = pairs.sort_values(["user_id", "item_id"], kind="stable")
    if pairs.empty:
        return [], []
    items = pairs["item_id"].map(item_index).fillna(-1).to_numpy(dtype=np.int64)
    user_col = pairs["user_id"].to_numpy(dtype=object)
    starts = np.flatnonzero(np.r_[True, user_col[1:] != user_col[:-1]])
    return [str(u) for u in user_col[starts]], np.split(items, starts[1:])


def evaluate_recommender(
    rec: Scorer,
    train: pd.DataFrame,
    test: pd.DataFrame,
    item_index: Mapping[str, int],
    ks: Sequence[int] = DEFAULT_KS,
    exclude_seen: bool = True,
    batch_size: int = 1024,
) -> EvalResult:
    """Rank the catalogue for every test user with an already fitted model.

    Args:
        rec: fitted model; `score(user_ids)` returns float [len(user_ids), len(item_index)].
        train: the interactions the model learnt from (for seen-item exclusion).
        test: held-out interactions; both in the `Dataset.interactions` layout.
        item_index: item_id -> column of the score matrix.
        ks: cut-offs; the ranking is computed once, to max(ks).
        exclude_seen: mask train items out of the ranking and the relevant sets.
        batch_size: users scored per `score` call (memory: batch_size x n_items floats),
            fewer where the catalogue is large (`SCORE_CHUNK`).

    Returns:
        `EvalResult` over the test users with at least one relevant item.
    """
    start = time.perf_counter()
    users, relevant = measurable_sets(train, test, item_index, exclude_seen)
    seen = UserItems.build(train, item_index) if exclude_seen else None
    n_items = len(item_index)
    batch_size = max(1, min(batch_size, SCORE_CHUNK // max(n_items, 1)))
    k_max = min(max(ks), n_items)
    top = np.empty((len(users), k_max), dtype=np.int64)
    for lo in range(0, len(users), batch_size):
        batch = users[lo : lo + batch_size]
        # A copy, so masking never writes into the model's own arrays.
        scores = np.array(rec.score(batch), dtype=np.float32)
        if scores.shape != (len(batch), n_items):
            raise ValueError(
                f"score() returned shape {scores.shape}, expected {(len(batch), n_items)}"
            )
        if seen is not None:
            rows, cols = seen.coords(batch)
            scores[rows, cols] = -np.inf
        top[lo : lo + len(batch)] = top_k(scores, k_max)
    per_user = per_user_metrics(top, relevant, ks)
    return EvalResult(
        means=means(per_user),
        per_user=per_user,
        user_ids=tuple(users),
        n_relevant=np.array([len(r) for r in relevant], dtype=np.int64),
        eval_seconds=time.perf_counter() - start,
    )


def run_baselines(
    train: pd.DataFrame,
    test: pd.DataFrame,
    item_index: Mapping[str, int],
    exclude_seen: bool = True,
    ks: Sequence[int] = DEFAULT_KS,
    names: Iterable[str] | None = None,
) -> dict[str, EvalResult]:
    """Fit and evaluate each baseline of `models.baselines.BASELINES` on one split.

    Args:
        train, test, item_index, exclude_seen, ks: as for `evaluate_recommender`.
        names: subset of `BASELINES` keys; all of them (most_popular, itemcf, itemcf_iuf,
            ease) by default.

    Returns:
        `{name: EvalResult}` with `fit_seconds` filled in, in the order run.
    """
    results: dict[str, EvalResult] = {}
    for name in BASELINES if names is None else names:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}")
        rec = BASELINES[name]()
        start = time.perf_counter()
        rec.fit(train, dict(item_index))
        fit_seconds = time.perf_counter() - start
        result = evaluate_recommender(rec, train, test, item_index, ks, exclude_seen)
        results[name] = replace(result, fit_seconds=fit_seconds)
    return results

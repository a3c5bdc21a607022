"""Top-K ranking metrics (recall, hit rate, NDCG) and bootstrap confidence intervals.

Conventions: gains are binary; the discount of rank r (1-based) is 1 / log2(r + 1); the
ideal DCG at K places min(|relevant|, K) hits first. Metric keys are `"{name}@{K}"`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_KS: tuple[int, ...] = (10, 20, 50, 100)
METRIC_NAMES: tuple[str, ...] = ("recall", "hit_rate", "ndcg")


def metric_keys(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """`["recall@10", …, "hit_rate@10", …, "ndcg@10", …]`: one family after another."""
    return [f"{name}@{k}" for name in METRIC_NAMES for k in ks]


def hit_matrix(top_items: np.ndarray, relevant: Sequence[np.ndarray]) -> np.ndarray:
    """Which recommended items are relevant.

    Args:
        top_items: int [U, L], item indices best first; negative entries are padding.
        relevant: U int arrays of distinct item indices; negative entries stand for items
            outside the catalogue and never match.

    Returns:
        bool [U, L]: `hits[u, r]` is True when `top_items[u, r]` is in `relevant[u]`.
    """
    top = np.asarray(top_items, dtype=np.int64)
    if top.ndim != 2 or len(relevant) != top.shape[0]:
        raise ValueError(
            f"top_items must be [U, L] with one relevant array per row; got shape "
            f"{top.shape} and {len(relevant)} relevant arrays"
        )
    n_users = top.shape[0]
    lengths = np.fromiter((len(r) for r in relevant), dtype=np.int64, count=n_users)
    flat = (
        np.concatenate([np.asarray(r, dtype=np.int64) for r in relevant])
        if n_users
        else np.empty(0, dtype=np.int64)
    )
    rows = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    known = flat >= 0
    # One int64 key per (user, item) pair turns the per-user set test into a single isin.
    stride = max(int(top.max(initial=0)), int(flat.max(initial=0))) + 1
    relevant_keys = rows[known] * stride + flat[known]
    top_keys = np.arange(n_users, dtype=np.int64)[:, None] * stride + top
    return np.isin(top_keys, relevant_keys) & (top >= 0)


def per_user_metrics(
    top_items: np.ndarray, relevant: Sequence[np.ndarray], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, np.ndarray]:
    """Recall, hit rate and NDCG at each K for every user.

    Args:
        top_items: int [U, L], item indices best first, no repeats within a row. A K larger
            than L scores the whole list (the ideal DCG still uses min(|relevant|, K)).
        relevant: U non-empty int arrays of distinct item indices (see `hit_matrix`).
        ks: cut-offs, each >= 1.

    Returns:
        `{"recall@K" | "hit_rate@K" | "ndcg@K": float64 [U]}` for every K in `ks`.

    Example:
        >>> per_user_metrics(np.array([[3, 1]]), [np.array([1])], ks=(2,))["ndcg@2"]
        array([0.63092975])
    """
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be >= 1, got {tuple(ks)}")
    hits = hit_matrix(top_items, relevant)
    n_relevant = np.fromiter((len(r) for r in relevant), dtype=np.int64, count=len(relevant))
    if np.any(n_relevant == 0):
        raise ValueError("every user needs at least one relevant item")
    width = hits.shape[1]
    k_max = max(ks, default=0)
    discount = 1.0 / np.log2(np.arange(2, max(width, k_max) + 2, dtype=np.float64))
    hit_count = np.cumsum(hits, axis=1, dtype=np.float64)
    dcg = np.cumsum(hits * discount[:width], axis=1)
    ideal = np.cumsum(discount)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        col = min(k, width) - 1
        hits_at_k = hit_count[:, col] if col >= 0 else np.zeros(len(relevant))
        dcg_at_k = dcg[:, col] if col >= 0 else np.zeros(len(relevant))
        out[f"recall@{k}"] = hits_at_k / n_relevant
        out[f"hit_rate@{k}"] = (hits_at_k > 0).astype(np.float64)
        out[f"ndcg@{k}"] = dcg_at_k / ideal[np.minimum(n_relevant, k) - 1]
    return {key: out[key] for key in metric_keys(ks)}


def ranking_metrics(
    top_items: np.ndarray, relevant: Sequence[np.ndarray], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Mean over users of `per_user_metrics`.

    Args:
        top_items: int [U, L], item indices best first.
        relevant: U non-empty int arrays of distinct item indices.
        ks: cut-offs.

    Returns:
        `{"recall@K": float, "hit_rate@K": float, "ndcg@K": float, …}`.
    """
    per_user = per_user_metrics(top_items, relevant, ks)
    return {key: float(values.mean()) for key, values in per_user.items()}


def bootstrap_ci(
    per_user: np.ndarray, n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a per-user metric's mean.

    Args:
        per_user: float [U], one metric value per user (from `per_user_metrics`).
        n: number of resamples of the users, with replacement.
        seed: resampling seed; the same inputs and seed give the same interval.
        alpha: 1 - confidence level (0.05 gives a 95 % interval).

    Returns:
        (low, high) bounds of the mean.
    """
    values = np.asarray(per_user, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"per_user must be a non-empty 1-D array, got shape {values.shape}")
    if n < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n >= 1 and alpha in (0, 1), got n={n}, alpha={alpha}")
    rng = np.random.default_rng(seed)
    means = np.empty(n, dtype=np.float64)
    # Chunks keep the [resamples, U] index matrix near 16 MB whatever U is.
    chunk = max(1, 2_000_000 // values.size)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        idx = rng.integers(0, values.size, size=(stop - start, values.size))
        means[start:stop] = values[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)

"""Top-K ranking metrics (recall, hit rate, NDCG) and bootstrap confidence intervals.

Conventions: gains are binary; the discount of rank r (1-based) is 1 / log2(r + 1); the
ideal DCG at K places min(|relevant|, K) hits first. Metric keys are `"{name}@{K}"`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_KS: tuple[int, ...] = (10, 20, 50, 100)
# The intervals of every report: fixed, so a report is reproducible and every model's
# interval comes from the same resamples of the (shared) evaluated users.
CI_RESAMPLES = 1000
CI_SEED = 0
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


def means(per_user: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Each metric's mean over the users (`per_user_metrics`' figures, in their order)."""
    return {key: float(values.mean()) for key, values in per_user.items()}


def bootstrap_sums(columns: np.ndarray, n: int = CI_RESAMPLES, seed: int = CI_SEED) -> np.ndarray:
    """Column sums over `n` resamples of the rows (users), drawn with replacement.

    Every column sees the same resamples, and the draws depend only on (U, n, seed): metrics
    of the same users are resampled together whichever of them are asked for.

    Args:
        columns: float [U, M], one row per user.
        n: number of resamples.
        seed: resampling seed; the same inputs and seed give the same sums.

    Returns:
        float64 [n, M]: row r holds the column sums over resample r's U users.

    Example:
        >>> bootstrap_sums(np.ones((4, 2)), n=3)
        array([[4., 4.],
               [4., 4.],
               [4., 4.]])
    """
    values = np.asarray(columns, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"columns must be a [U, M] array with U >= 1, got shape {values.shape}")
    if n < 1:
        raise ValueError(f"need n >= 1 resamples, got {n}")
    n_users = values.shape[0]
    rng = np.random.default_rng(seed)
    sums = np.empty((n, values.shape[1]), dtype=np.float64)
    # Chunks keep the [resamples, U] index matrix near 16 MB whatever U is.
    chunk = max(1, 2_000_000 // n_users)
    for start in range(0, n, chunk):
        rows = min(n, start + chunk) - start
        idx = rng.integers(0, n_users, size=(rows, n_users))
        # How often each resample drew each user: one matrix product then sums every column.
        idx += np.arange(rows)[:, None] * n_users
        counts = np.bincount(idx.ravel(), minlength=rows * n_users).reshape(rows, n_users)
        sums[start : start + rows] = counts.astype(np.float64) @ values
    return sums


def _percentile_interval(
    resampled: np.ndarray, estimate: np.ndarray, alpha: float
) -> list[tuple[float, float]]:
    """(low, high) of each column of float [n, M] resampled statistics."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"need alpha in (0, 1), got {alpha}")
    low, high = np.quantile(resampled, [alpha / 2, 1 - alpha / 2], axis=0)
    # A resampled sum can round an ulp away from the full sample's value (a metric equal for
    # every user): the interval is widened to hold the estimate it is printed beside.
    low, high = np.minimum(low, estimate), np.maximum(high, estimate)
    return [(float(lo), float(hi)) for lo, hi in zip(low, high, strict=True)]


def bootstrap_cis(
    per_user: Mapping[str, np.ndarray],
    n: int = CI_RESAMPLES,
    seed: int = CI_SEED,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of several per-user metrics' means.

    All metrics share one set of resamples of the users (`bootstrap_sums`), so the cost is
    one [n, U] draw whatever the number of metrics, and each interval is `bootstrap_ci` of
    that metric alone with the same `n` and `seed` (up to the rounding of the sums).

    Args:
        per_user: `{metric: float [U]}`, the same U users in every array.
        n: number of resamples of the users, with replacement.
        seed: resampling seed; the same inputs and seed give the same intervals.
        alpha: 1 - confidence level (0.05 gives a 95 % interval).

    Returns:
        `{metric: (low, high)}` bounds of each mean, in the order of `per_user`.
    """
    names = list(per_user)
    if not names:
        return {}
    try:
        values = np.stack([np.asarray(per_user[m], dtype=np.float64) for m in names], axis=1)
    except ValueError as exc:
        raise ValueError(f"per_user arrays must all be 1-D of one length: {exc}") from exc
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"per_user arrays must be non-empty and 1-D, got {values.shape[:1]}")
    means = bootstrap_sums(values, n=n, seed=seed) / values.shape[0]
    bounds = _percentile_interval(means, values.mean(axis=0), alpha)
    return dict(zip(names, bounds, strict=True))


def bootstrap_ci(
    per_user: np.ndarray, n: int = CI_RESAMPLES, seed: int = CI_SEED, alpha: float = 0.05
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
    return bootstrap_cis({"metric": values}, n=n, seed=seed, alpha=alpha)["metric"]


def bootstrap_pooled_ci(
    hits: np.ndarray,
    n_relevant: np.ndarray,
    n: int = CI_RESAMPLES,
    seed: int = CI_SEED,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a pooled ratio, total hits / total relevant.

    Each resample draws users and recomputes both totals over them (a ratio of sums, not a
    mean of per-user ratios), with the same draws as `bootstrap_cis` for the same U, n, seed.

    Args:
        hits: float [U], each user's relevant items found in the top K.
        n_relevant: int [U], size of each user's relevant set.
        n, seed, alpha: as for `bootstrap_cis`.

    Returns:
        (low, high) bounds of `hits.sum() / n_relevant.sum()`; a resample with no relevant
        item scores 0.

    Example:
        >>> bootstrap_pooled_ci(np.array([1.0, 0.0]), np.array([1, 3]), n=200)[0] >= 0.0
        True
    """
    found = np.asarray(hits, dtype=np.float64)
    total = np.asarray(n_relevant, dtype=np.float64)
    if found.ndim != 1 or found.shape != total.shape or found.size == 0:
        raise ValueError(
            f"hits and n_relevant must be non-empty 1-D arrays of one length, got shapes "
            f"{found.shape} and {total.shape}"
        )
    sums = bootstrap_sums(np.stack([found, total], axis=1), n=n, seed=seed)

    def ratio(h: np.ndarray, r: np.ndarray) -> np.ndarray:
        return np.divide(h, r, out=np.zeros_like(h), where=r > 0)

    estimate = ratio(found.sum(keepdims=True), total.sum(keepdims=True))
    ((low, high),) = _percentile_interval(ratio(sums[:, :1], sums[:, 1:]), estimate, alpha)
    return low, high

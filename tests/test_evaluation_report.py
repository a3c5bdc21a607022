"""The evaluation report: every mean with its 95 % bootstrap interval, in JSON and as a table."""

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest

from models.evaluation import EvalResult, evaluate_recommender
from models.metrics import CI_RESAMPLES, CI_SEED, bootstrap_ci, means, per_user_metrics
from models.report import format_table, report_json


def frame(pairs: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        [(u, i, t) for t, (u, i) in enumerate(pairs)],
        columns=["user_id", "item_id", "timestamp"],
    ).astype({"timestamp": "int64"})


class FixedScores:
    """Scores every user with the same row: item 0 best, then 1, 2, …"""

    def __init__(self, n_items: int) -> None:
        self.row = np.arange(n_items, 0, -1, dtype=np.float32)

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        return np.broadcast_to(self.row, (len(user_ids), self.row.size))


def random_result(seed: int, n_users: int = 200, n_items: int = 60) -> EvalResult:
    """An `EvalResult` of random rankings: metrics that vary from user to user."""
    rng = np.random.default_rng(seed)
    top = np.stack([rng.permutation(n_items)[:20] for _ in range(n_users)])
    relevant = [rng.choice(n_items, size=rng.integers(1, 6), replace=False) for _ in top]
    per_user = per_user_metrics(top, relevant, ks=(5, 20))
    return EvalResult(
        means=means(per_user),
        per_user=per_user,
        user_ids=tuple(f"u{i}" for i in range(n_users)),
        n_relevant=np.array([len(r) for r in relevant], dtype=np.int64),
        eval_seconds=0.0,
    )


TEST = frame([("u0", "a"), ("u1", "b"), ("u1", "c")])


def test_report_has_an_interval_beside_every_mean() -> None:
    results = {"model": random_result(1), "other": random_result(2)}
    report = report_json("leave-last-n:1", TEST, results)
    assert set(report) == {"split", "n_test_users", "n_test_interactions", "results", "ci95"}
    assert report["results"]["model"] == results["model"].means
    assert list(report["ci95"]) == ["model", "other"]
    for name, result in results.items():
        assert list(report["ci95"][name]) == list(result.means)
        for metric, bounds in report["ci95"][name].items():
            assert isinstance(bounds, list) and len(bounds) == 2
            low, high = bounds
            assert 0.0 <= low < result.means[metric] < high <= 1.0, metric
            assert (low, high) == result.ci(metric, n=CI_RESAMPLES, seed=CI_SEED)
    # Plain JSON (lists, floats): the bundle manifest stores it and reads back the same.
    assert json.loads(json.dumps(report)) == report
    assert report_json("leave-last-n:1", TEST, results) == report


def test_table_prints_each_interval_under_its_mean() -> None:
    results = {"model": random_result(1), "other_model": random_result(2)}
    report = report_json("leave-last-n:1", TEST, results)
    lines = format_table(report).splitlines()
    assert lines[0] == "split leave-last-n:1: 2 test users, 3 test interactions"
    assert lines[1].split() == ["method", "R@5", "R@20", "HR@5", "HR@20", "NDCG@5", "NDCG@20"]
    assert [line[:12].strip() for line in lines[2:]] == [
        *("model", "ci95 low", "ci95 high", "other_model", "ci95 low", "ci95 high"),
    ]
    assert len({len(line) for line in lines[1:]}) == 1
    metrics = list(results["model"].means)
    for row, name in ((2, "model"), (5, "other_model")):
        means, lows, highs = ([float(c) for c in lines[row + i][12:].split()] for i in range(3))
        assert means == [round(report["results"][name][m], 4) for m in metrics]
        assert lows == [round(report["ci95"][name][m][0], 4) for m in metrics]
        assert highs == [round(report["ci95"][name][m][1], 4) for m in metrics]
        assert all(lo <= mean <= hi for lo, mean, hi in zip(lows, means, highs, strict=True))


def test_a_report_without_intervals_prints_means_only() -> None:
    """Reports stored before the intervals (older bundle manifests) still print."""
    report = report_json("leave-last-n:1", TEST, {"model": random_result(1)})
    del report["ci95"]
    lines = format_table(report).splitlines()
    assert len(lines) == 3 and lines[2].split()[0] == "model"


def test_pooled_recall_interval_resamples_users() -> None:
    index = {str(i): i for i in range(6)}
    train = frame([("u", "5"), ("v", "5")])
    test = frame([("u", "0"), ("v", "3"), ("v", "4"), ("v", "2")])
    result = evaluate_recommender(FixedScores(6), train, test, index, ks=(1,))
    # u finds 1 of 1 relevant item at K = 1; v's best unseen item is 0, not relevant: 0 of 3.
    # Pooled, heavy users weigh more: (1 + 0) / (1 + 3); per user (1/1 + 0/3) / 2.
    assert result.n_relevant.tolist() == [1, 3]
    assert result.means["recall@1"] == pytest.approx(0.5)
    assert result.pooled_recall(1) == pytest.approx(0.25)
    # Resampling two users: {u, u} 2/2 = 1 (p 1/4), {u, v} 1/4 (p 1/2), {v, v} 0/6 = 0 (p 1/4);
    # a mean of per-user recalls would give 1, 0.5 and 0 instead.
    assert result.pooled_recall_ci(1, n=2000) == (0.0, 1.0)
    assert result.pooled_recall_ci(1, n=2000, alpha=0.8) == (0.25, 0.25)
    assert result.ci("recall@1", n=2000, alpha=0.8) == (0.5, 0.5)
    # The resamples are the seed's: a report is reproducible, another seed draws others.
    many = random_result(3, n_users=500)
    assert many.pooled_recall_ci(5) == many.pooled_recall_ci(5, seed=CI_SEED)
    assert many.pooled_recall_ci(5) != many.pooled_recall_ci(5, seed=CI_SEED + 1)


def test_every_metric_is_resampled_with_the_same_users() -> None:
    result = random_result(3, n_users=500)
    intervals = result.intervals()
    assert list(intervals) == list(result.means)
    for metric, bounds in intervals.items():
        assert bounds == result.ci(metric)
        assert bounds == pytest.approx(bootstrap_ci(result.per_user[metric]), abs=1e-12)

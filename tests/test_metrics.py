import math

import numpy as np
import pytest

from models.metrics import (
    bootstrap_ci,
    bootstrap_cis,
    bootstrap_pooled_ci,
    bootstrap_sums,
    means,
    per_user_metrics,
)

LOG2_3 = math.log2(3)
LOG2_5 = math.log2(5)


def test_two_users_by_hand() -> None:
    top = np.array([[5, 2, 7, 1], [3, 4, 6, 8]])
    relevant = [np.array([2, 1, 9]), np.array([8])]
    per_user = per_user_metrics(top, relevant, ks=(2, 4))

    # User 0: hits at ranks 2 and 4, |relevant| = 3.
    #   recall@2 = 1/3, recall@4 = 2/3; hit_rate@2 = hit_rate@4 = 1
    #   DCG@2 = 1/log2(3); IDCG@2 = 1 + 1/log2(3)
    #   DCG@4 = 1/log2(3) + 1/log2(5); IDCG@4 = 1 + 1/log2(3) + 1/log2(4) (min(3, 4) = 3 hits)
    # User 1: one hit at rank 4, |relevant| = 1.
    #   @2: all zero; recall@4 = 1, hit_rate@4 = 1, NDCG@4 = (1/log2(5)) / 1
    np.testing.assert_allclose(per_user["recall@2"], [1 / 3, 0.0])
    np.testing.assert_allclose(per_user["recall@4"], [2 / 3, 1.0])
    np.testing.assert_allclose(per_user["hit_rate@2"], [1.0, 0.0])
    np.testing.assert_allclose(per_user["hit_rate@4"], [1.0, 1.0])
    ndcg2_u0 = (1 / LOG2_3) / (1 + 1 / LOG2_3)  # = 0.386853
    ndcg4_u0 = (1 / LOG2_3 + 1 / LOG2_5) / (1 + 1 / LOG2_3 + 0.5)  # = 1.061606 / 2.130930
    np.testing.assert_allclose(per_user["ndcg@2"], [ndcg2_u0, 0.0])
    np.testing.assert_allclose(per_user["ndcg@4"], [ndcg4_u0, 1 / LOG2_5])
    assert ndcg4_u0 == pytest.approx(0.498189, abs=1e-6)

    averaged = means(per_user)
    assert list(averaged) == [
        "recall@2",
        "recall@4",
        "hit_rate@2",
        "hit_rate@4",
        "ndcg@2",
        "ndcg@4",
    ]
    assert averaged["recall@2"] == pytest.approx(1 / 6)  # (1/3 + 0) / 2
    assert averaged["recall@4"] == pytest.approx(5 / 6)  # (2/3 + 1) / 2
    assert averaged["hit_rate@2"] == pytest.approx(0.5)
    assert averaged["ndcg@4"] == pytest.approx((ndcg4_u0 + 1 / LOG2_5) / 2)


def test_items_outside_catalogue_are_misses() -> None:
    # relevant {0, unknown}: one hit at rank 1 out of 2 relevant.
    # recall@2 = 1/2; NDCG@2 = 1 / (1 + 1/log2(3)) = 0.613147
    out = per_user_metrics(np.array([[0, 1]]), [np.array([0, -1])], ks=(2,))
    assert out["recall@2"][0] == pytest.approx(0.5)
    assert out["ndcg@2"][0] == pytest.approx(1 / (1 + 1 / LOG2_3))


def test_k_beyond_list_length_scores_whole_list() -> None:
    # A 1-item list with K = 5: recall = 1/2; IDCG uses min(2, 5) = 2 positions.
    out = per_user_metrics(np.array([[0]]), [np.array([0, 1])], ks=(5,))
    assert out["recall@5"][0] == pytest.approx(0.5)
    assert out["ndcg@5"][0] == pytest.approx(1 / (1 + 1 / LOG2_3))


def test_padding_never_hits() -> None:
    # -1 in the list is padding; the relevant -1 stands for an unknown item: no match.
    out = per_user_metrics(np.array([[-1, 3], [2, -1]]), [np.array([-1, 3]), np.array([0])])
    assert out["recall@10"].tolist() == [0.5, 0.0]


def test_users_do_not_share_relevant_items() -> None:
    # Item 1 is relevant for user 0 only; user 1 ranking it first gets nothing.
    out = per_user_metrics(np.array([[0], [1]]), [np.array([1]), np.array([0])], ks=(1,))
    assert out["hit_rate@1"].tolist() == [0.0, 0.0]


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="at least one relevant"):
        per_user_metrics(np.array([[0, 1]]), [np.array([], dtype=np.int64)])
    with pytest.raises(ValueError, match="one relevant array per row"):
        per_user_metrics(np.array([[0, 1]]), [np.array([0]), np.array([1])])
    with pytest.raises(ValueError, match="K must be >= 1"):
        per_user_metrics(np.array([[0]]), [np.array([0])], ks=(0,))


def test_bootstrap_ci() -> None:
    assert bootstrap_ci(np.full(50, 0.25)) == (0.25, 0.25)
    values = np.random.default_rng(1).random(400)
    low, high = bootstrap_ci(values, n=500, seed=3)
    assert low < values.mean() < high
    assert (low, high) == bootstrap_ci(values, n=500, seed=3)
    # Standard error of the mean of U(0,1) over 400 users ~ 0.0144; 95 % width ~ 4 * 0.0144.
    assert high - low == pytest.approx(3.92 * values.std() / 20, rel=0.2)
    low90, high90 = bootstrap_ci(values, n=500, seed=3, alpha=0.1)
    assert low < low90 < high90 < high
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([]))


def test_bootstrap_cis_share_one_set_of_resamples() -> None:
    rng = np.random.default_rng(2)
    per_user = {"a": rng.random(300), "b": rng.integers(0, 2, 300).astype(np.float64)}
    intervals = bootstrap_cis(per_user, n=400, seed=5)
    assert list(intervals) == ["a", "b"]
    for name, values in per_user.items():
        # Each metric's interval is the one it would get alone: same draws, same bounds.
        assert intervals[name] == pytest.approx(bootstrap_ci(values, n=400, seed=5), abs=1e-12)
        low, high = intervals[name]
        assert low < values.mean() < high
    assert intervals == bootstrap_cis(per_user, n=400, seed=5)
    assert intervals != bootstrap_cis(per_user, n=400, seed=6)
    # A metric equal for every user: a resampled sum may round an ulp off, yet the interval
    # still holds the mean printed beside it.
    third = np.full(7, 1 / 3)
    low, high = bootstrap_cis({"c": third})["c"]
    assert low <= third.mean() <= high and high - low < 1e-15
    with pytest.raises(ValueError, match="one length"):
        bootstrap_cis({"a": np.ones(3), "b": np.ones(4)})


def test_bootstrap_sums_count_each_drawn_user() -> None:
    # User u's column is the indicator of u: each resample's sums count how often it drew u.
    sums = bootstrap_sums(np.eye(5), n=50, seed=1)
    assert sums.shape == (50, 5)
    assert np.all(sums.sum(axis=1) == 5) and np.all(sums == np.round(sums))
    assert np.array_equal(sums, bootstrap_sums(np.eye(5), n=50, seed=1))
    with pytest.raises(ValueError, match="U >= 1"):
        bootstrap_sums(np.empty((0, 2)))


def test_pooled_bootstrap_by_hand() -> None:
    # u found 1 of 1 relevant item, v 0 of 3: pooled recall (1 + 0) / (1 + 3) = 0.25, while
    # the mean of per-user recalls is (1 + 0) / 2 = 0.5. Resampling two users from {u, v}:
    #   {u, u} p = 1/4: 2 / 2 = 1.0    {u, v} p = 1/2: 1 / 4 = 0.25    {v, v} p = 1/4: 0 / 6 = 0
    # so the 2.5 % and 97.5 % quantiles are 0 and 1, and the middle 20 % (quantiles 0.4 and
    # 0.6) is 0.25 exactly; a mean of per-user ratios would put it at 0.5.
    hits, relevant = np.array([1.0, 0.0]), np.array([1, 3])
    assert bootstrap_pooled_ci(hits, relevant, n=2000) == (0.0, 1.0)
    assert bootstrap_pooled_ci(hits, relevant, n=2000, alpha=0.8) == (0.25, 0.25)
    assert bootstrap_ci(np.array([1.0, 0.0]), n=2000, alpha=0.8) == (0.5, 0.5)
    # Every user at the same ratio: every resample has it too.
    assert bootstrap_pooled_ci(np.array([1.0, 2.0, 3.0]), np.array([2, 4, 6])) == (0.5, 0.5)
    with pytest.raises(ValueError, match="one length"):
        bootstrap_pooled_ci(np.ones(2), np.ones(3))

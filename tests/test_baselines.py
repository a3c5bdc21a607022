"""Baselines and the evaluator that ranks with them."""

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest

from models.baselines import (
    BASELINES,
    EASE,
    ItemCF,
    MostPopular,
    UserItems,
    check_dense_fits,
)
from models.dataset import DataError
from models.evaluation import (
    evaluate_recommender,
    run_baselines,
    top_k,
)
from models.report import format_table, report_json

ITEMS = {"A": 0, "B": 1, "C": 2}


def frame(pairs: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        [(u, i, t) for t, (u, i) in enumerate(pairs)],
        columns=["user_id", "item_id", "timestamp"],
    ).astype({"timestamp": "int64"})


# Users of each item: A {u1, u2, u4}, B {u1, u2, u3}, C {u2, u3}.
TOY = frame(
    [
        ("u1", "A"),
        ("u1", "B"),
        ("u2", "A"),
        ("u2", "B"),
        ("u2", "C"),
        ("u3", "B"),
        ("u3", "C"),
        ("u4", "A"),
        ("u4", "A"),  # a repeat: one entry of the binary matrix
    ]
)


def test_user_items_rows() -> None:
    history = UserItems.build(TOY, ITEMS)
    assert history.lengths().tolist() == [2, 3, 2, 1]
    np.testing.assert_array_equal(
        history.dense(["u4", "nobody", "u3"]), [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    )
    rows, cols = history.coords(["u3", "u1"])
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 1), (0, 2), (1, 0), (1, 1)]
    with pytest.raises(ValueError, match="not in the catalogue"):
        UserItems.build(frame([("u1", "Z")]), ITEMS)


def test_most_popular_orders_by_interaction_count() -> None:
    rec = MostPopular()
    rec.fit(TOY, ITEMS)
    scores = rec.score(["u1", "unknown"])
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, [[4, 3, 2], [4, 3, 2]])  # A: 4 rows, B: 3, C: 2


def test_itemcf_cosine_by_hand() -> None:
    # co-occurrence: AB = 2 (u1, u2), AC = 1 (u2), BC = 2 (u2, u3); N = A 3, B 3, C 2
    # sim AB = 2/sqrt(3*3) = 0.666667; AC = 1/sqrt(3*2) = 0.408248; BC = 2/sqrt(6) = 0.816497
    rec = ItemCF()
    rec.fit(TOY, ITEMS)
    ab, ac, bc = 2 / 3, 1 / math.sqrt(6), 2 / math.sqrt(6)
    np.testing.assert_allclose(rec.weights, [[0, ab, ac], [ab, 0, bc], [ac, bc, 0]], rtol=1e-6)
    # u4 = {A}: row A; u1 = {A, B}: rows A + B.
    np.testing.assert_allclose(
        rec.score(["u4", "u1", "new"]),
        [[0.0, ab, ac], [ab, ab, ac + bc], [0.0, 0.0, 0.0]],
        rtol=1e-6,
    )


def test_itemcf_iuf_weights_by_hand() -> None:
    # 1/ln(1 + |history|): u1 (2 items) 1/ln 3 = 0.910239, u2 (3) 1/ln 4 = 0.721348,
    # u3 (2) 0.910239, u4 (1) 1/ln 2 = 1.442695 (u4 shares no pair, so it never counts).
    # AB = (w1 + w2) / 3 = 0.543862; AC = w2 / sqrt(6) = 0.294489; BC = (w2 + w3)/sqrt(6)
    w1, w2, w3 = 1 / math.log(3), 1 / math.log(4), 1 / math.log(3)
    ab, ac, bc = (w1 + w2) / 3, w2 / math.sqrt(6), (w2 + w3) / math.sqrt(6)
    assert ab == pytest.approx(0.543862, abs=1e-6)
    rec = ItemCF(iuf=True)
    rec.fit(TOY, ITEMS)
    assert rec.name == "itemcf_iuf"
    # u1 = {A, B}: C scores AC + BC = 0.960584 (plain cosine: 1.224745)
    np.testing.assert_allclose(rec.score(["u1"]), [[ab, ab, ac + bc]], rtol=1e-6)


def test_itemcf_keeps_only_top_neighbours() -> None:
    # neighbours=1: row A keeps B (0.667 > 0.408), rows B and C keep each other (0.816).
    rec = ItemCF(neighbours=1)
    rec.fit(TOY, ITEMS)
    bc = 2 / math.sqrt(6)
    np.testing.assert_allclose(rec.weights, [[0, 2 / 3, 0], [0, 0, bc], [0, bc, 0]], rtol=1e-6)
    # u1 = {A, B}: A from B's row: 0; B from A's row: 2/3; C from B's row only.
    np.testing.assert_allclose(rec.score(["u1"]), [[0, 2 / 3, bc]], rtol=1e-6)


def test_itemcf_default_keeps_fifty_largest_per_row() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items = 300, 80
    x = rng.random((n_users, n_items)) < 0.15
    users, items = np.nonzero(x)
    train = pd.DataFrame({"user_id": users.astype(str), "item_id": items.astype(str)})
    index = {str(i): i for i in range(n_items)}
    rec = ItemCF()
    rec.fit(train, index)
    counts = x.sum(axis=0).astype(float)
    full = (x.T.astype(float) @ x) / np.sqrt(np.outer(counts, counts))
    np.fill_diagonal(full, 0.0)
    for row, kept in zip(full, rec.weights, strict=True):
        nonzero = kept != 0
        assert nonzero.sum() == min(50, np.count_nonzero(row))
        np.testing.assert_allclose(kept[nonzero], row[nonzero], rtol=1e-5)
        assert row[nonzero].min() >= row[~nonzero].max() - 1e-6


def test_ease_matches_closed_form() -> None:
    rng = np.random.default_rng(1)
    x = (rng.random((12, 6)) < 0.4).astype(np.float64)
    users, items = np.nonzero(x)
    train = pd.DataFrame({"user_id": [f"u{u}" for u in users], "item_id": items.astype(str)})
    rec = EASE(l2=2.0)
    rec.fit(train, {str(i): i for i in range(6)})
    p = np.linalg.inv(x.T @ x + 2.0 * np.eye(6))
    expected = np.eye(6) - p @ np.diag(1 / np.diag(p))
    np.testing.assert_allclose(rec.weights, expected, atol=1e-6)
    np.testing.assert_array_equal(np.diagonal(rec.weights), 0.0)
    np.testing.assert_allclose(rec.score(["u0"]), x[:1] @ expected, atol=1e-5)


class FixedScores:
    """Scores every user with the same row: item 0 best, then 1, 2, …"""

    def __init__(self, n_items: int) -> None:
        self.row = np.arange(n_items, 0, -1, dtype=np.float32)

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        return np.broadcast_to(self.row, (len(user_ids), self.row.size))


def test_top_k_sorted_best_first() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [3.0, 1.0, 2.0, -np.inf]], dtype=np.float32)
    assert top_k(scores, 3).tolist() == [[1, 3, 2], [0, 2, 1]]
    assert top_k(scores, 9).tolist() == [[1, 3, 2, 0], [0, 2, 1, -1]]  # -inf: no item


def test_an_item_scored_minus_inf_is_never_a_hit() -> None:
    """A bundle scores -inf the items it cannot score (another catalogue's): ranked among
    the ties, a relevant one counted as found (`evaluate --any-split` read recall@10 0.42
    for a bundle that shared no item with the data)."""

    class Unscorable(FixedScores):
        def score(self, user_ids: Sequence[str]) -> np.ndarray:
            return np.full((len(user_ids), self.row.size), -np.inf, dtype=np.float32)

    index = {str(i): i for i in range(3)}
    train, test = frame([("u", "0")]), frame([("u", "1"), ("u", "2")])
    assert evaluate_recommender(FixedScores(3), train, test, index, ks=(2,)).means[
        "recall@2"
    ] == pytest.approx(1.0)
    result = evaluate_recommender(Unscorable(3), train, test, index, ks=(2,))
    assert result.means["recall@2"] == 0.0 and result.means["ndcg@2"] == 0.0


def test_seen_items_are_excluded() -> None:
    index = {str(i): i for i in range(5)}
    train = frame([("u", "0"), ("v", "1"), ("w", "0")])
    test = frame([("u", "0"), ("u", "2"), ("v", "0"), ("w", "0")])
    rec = FixedScores(5)
    # Seen excluded: u's ranking is 1, 2, 3, 4 and only item 2 is relevant (hit at rank 2);
    # v's ranking is 0, 2, 3, 4 (hit at rank 1); w saw its only test item: skipped.
    result = evaluate_recommender(rec, train, test, index, ks=(1, 2))
    assert result.user_ids == ("u", "v")
    assert result.per_user["recall@1"].tolist() == [0.0, 1.0]
    assert result.per_user["recall@2"].tolist() == [1.0, 1.0]
    assert result.means["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1.0) / 2)
    # Seen included: u's relevant set is {0, 2} and item 0 is ranked first.
    included = evaluate_recommender(rec, train, test, index, ks=(1, 2), exclude_seen=False)
    assert included.user_ids == ("u", "v", "w")
    assert included.per_user["recall@1"].tolist() == [0.5, 1.0, 1.0]


def test_a_test_part_with_nothing_to_find_is_an_error_not_zero() -> None:
    """Every test item already seen: every metric would read 0.0, as if the model had
    missed everything."""
    index = {str(i): i for i in range(3)}
    train = frame([("u", "0"), ("v", "1")])
    test = frame([("u", "0"), ("v", "1")])
    with pytest.raises(
        DataError, match="the test part has no user with an item not seen in training"
    ):
        evaluate_recommender(FixedScores(3), train, test, index)
    with pytest.raises(DataError, match="the test part has no user with an item to find"):
        evaluate_recommender(FixedScores(3), train, test.iloc[:0], index, exclude_seen=False)


def test_catalogues_too_large_for_dense_item_matrices_are_refused_up_front() -> None:
    check_dense_fits(3_000, "--baselines")  # ML-1M's catalogue: 0.2 GiB
    with pytest.raises(DataError, match=r"--baselines holds dense 1,000,000 x 1,000,000"):
        check_dense_fits(1_000_000, "--baselines")  # 28 TB


def test_unknown_test_items_count_as_misses() -> None:
    index = {"0": 0, "1": 1}
    train = frame([("u", "1")])
    test = frame([("u", "0"), ("u", "gone"), ("u", "lost")])
    result = evaluate_recommender(FixedScores(2), train, test, index, ks=(10,), batch_size=1)
    assert result.means["recall@10"] == pytest.approx(1 / 3)


def test_run_baselines_and_report() -> None:
    train = pd.concat([TOY, frame([("u5", "B"), ("u5", "A")])], ignore_index=True)
    test = frame([("u1", "C"), ("u3", "A"), ("u4", "B")])
    results = run_baselines(train, test, ITEMS, ks=(1, 2))
    assert list(results) == ["most_popular", "itemcf", "itemcf_iuf", "ease"] == list(BASELINES)
    # Most popular: A 5, B 4, C 2; each user's best unseen item: u1 -> C (hit),
    # u3 -> A (hit), u4 -> B (hit).
    assert results["most_popular"].means["recall@1"] == 1.0
    assert results["itemcf"].fit_seconds > 0
    report = report_json("leave-last-n:1", test, results)
    assert set(report) == {"split", "n_test_users", "n_test_interactions", "results", "ci95"}
    assert (report["split"], report["n_test_users"], report["n_test_interactions"]) == (
        "leave-last-n:1",
        3,
        3,
    )
    assert report["results"]["ease"] == results["ease"].means
    assert all(isinstance(v, float) for v in report["results"]["itemcf"].values())
    lines = format_table(report).splitlines()
    assert lines[0] == "split leave-last-n:1: 3 test users, 3 test interactions"
    assert lines[1].split() == ["method", "R@1", "R@2", "HR@1", "HR@2", "NDCG@1", "NDCG@2"]
    assert lines[2].split()[:2] == ["most_popular", "1.0000"]
    assert len({len(line) for line in lines[1:]}) == 1
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baselines(train, test, ITEMS, names=["nope"])

import pandas as pd
import pytest

from models.splits import SEED_2003_CUTOFF, fingerprint, make_split, validation_split


def log(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    frame["timestamp"] = frame["timestamp"].astype("int64")
    return frame.sort_values("timestamp", kind="stable").reset_index(drop=True)


def test_seed_2003_cutoff_and_unseen_users() -> None:
    assert SEED_2003_CUTOFF == 1041379200  # 2003-01-01T00:00:00Z
    c = SEED_2003_CUTOFF
    interactions = log(
        [
            ("a", "1", c - 100),
            ("b", "2", c - 1),
            ("a", "3", c),  # exactly at the cut: test
            ("c", "4", c + 5),  # c never trained: dropped
            ("b", "5", c + 10),
        ]
    )
    split = make_split(interactions, "seed-2003")
    assert split.name == "seed-2003"
    assert split.train["item_id"].tolist() == ["1", "2"]
    assert split.test["item_id"].tolist() == ["3", "5"]
    assert split.train["timestamp"].max() < c <= split.test["timestamp"].min()
    assert list(split.test.index) == [0, 1]
    assert list(split.test.columns) == ["user_id", "item_id", "timestamp"]


def test_last_10pct_cuts_at_a_timestamp() -> None:
    # 21 interactions; round(0.1 * 21) = 2, so the cut is the timestamp of the 2nd one from
    # the end (t = 18). The 3rd from the end shares t = 18: both t = 18 rows go to test.
    rows = [(f"u{i % 4}", str(i), i) for i in range(18)]
    rows += [("u1", "x", 18), ("u2", "y", 18), ("new", "z", 19)]
    split = make_split(log(rows), "last-10pct")
    assert split.train["timestamp"].max() == 17
    assert sorted(split.test["item_id"]) == ["x", "y"]  # "new" has no training history
    assert split.summary() == {
        "split": "last-10pct",
        "train_fingerprint": fingerprint(split.train),
        "n_train_interactions": 18,
        "n_test_interactions": 2,
        "n_train_users": 4,
        "n_test_users": 2,
    }


def test_time_split_never_puts_test_before_train() -> None:
    rows = [(f"u{i % 7}", str(i % 11), (i * 37) % 50) for i in range(200)]
    shuffled = log(rows).sample(frac=1.0, random_state=0)
    split = make_split(shuffled, "last-10pct")
    assert split.train["timestamp"].max() < split.test["timestamp"].min()
    assert split.train["timestamp"].is_monotonic_increasing
    assert len(split.test) >= 20
    assert set(split.test["user_id"]) <= set(split.train["user_id"])


def test_leave_last_n_per_user() -> None:
    interactions = log(
        [
            ("a", "a1", 1),
            ("b", "b1", 2),
            ("a", "a2", 3),
            ("c", "c1", 3),
            ("a", "a3", 4),
            ("b", "b2", 5),
            ("a", "a4", 6),
            ("c", "c2", 7),
            ("c", "c3", 7),  # ties keep log order: c3 counts as after c2
        ]
    )
    split = make_split(interactions, "leave-last-n:2")
    assert split.name == "leave-last-n:2"
    test_items = split.test.groupby("user_id")["item_id"].apply(list).to_dict()
    assert test_items == {"a": ["a3", "a4"], "c": ["c2", "c3"]}  # b has only 2: all train
    assert sorted(split.train["item_id"]) == ["a1", "a2", "b1", "b2", "c1"]
    one = make_split(interactions, " leave-last-n:1 ")
    assert one.test["item_id"].tolist() == ["b2", "a4", "c3"]


@pytest.mark.parametrize(
    "spec", ["none", "", "last-5pct", "leave-last-n:0", "leave-last-n:x", "leave-last-n"]
)
def test_bad_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="'seed-2003', 'last-10pct' or 'leave-last-n:N'"):
        make_split(log([("a", "1", 1), ("a", "2", 2)]), spec)


def test_split_that_leaves_a_part_empty_is_refused() -> None:
    with pytest.raises(ValueError, match="seed-2003"):
        make_split(log([("a", "1", 5), ("a", "2", 6)]), "seed-2003")
    with pytest.raises(ValueError, match="no user has more than 3"):
        make_split(log([("a", "1", 5), ("a", "2", 6)]), "leave-last-n:3")
    with pytest.raises(ValueError, match="last-10pct"):
        make_split(log([("a", "1", 5), ("a", "2", 5), ("a", "3", 5)]), "last-10pct")


def test_validation_split_uses_the_last_10pct_rule_on_train() -> None:
    rows = [(f"u{i % 5}", str(i), i // 2) for i in range(60)]
    train = make_split(log(rows), "leave-last-n:1").train
    val = validation_split(train)
    same = make_split(train, "last-10pct")
    assert val.name == "validation"
    pd.testing.assert_frame_equal(val.train, same.train)
    pd.testing.assert_frame_equal(val.test, same.test)
    assert val.train["timestamp"].max() < val.test["timestamp"].min()
    assert val.test["timestamp"].max() <= train["timestamp"].max()
    assert len(validation_split(train, fraction=0.5).test) > len(val.test)
    with pytest.raises(ValueError, match="fraction"):
        validation_split(train, fraction=1.0)


def test_validation_min_gap_keeps_only_returning_users() -> None:
    day = 86400
    rows = [(u, f"{u}{i}", i) for u in ("a", "b", "c") for i in range(6)]  # the earlier part
    rows += [
        ("a", "a-next", 10 * day),  # returns 10 days later
        ("a", "a-more", 11 * day),
        ("b", "b-next", 2 * day),  # goes on 2 days later
        ("b", "b-late", 30 * day),  # a later return does not make b a returning user
        ("c", "c-next", 7 * day + 5),  # exactly 7 days after its last (t = 5): kept
    ]
    train = log(rows)
    everyone = validation_split(train, fraction=0.2)
    returning = validation_split(train, fraction=0.2, min_gap_days=7)
    assert set(everyone.test["user_id"]) == {"a", "b", "c"}
    pd.testing.assert_frame_equal(returning.train, everyone.train)
    assert sorted(returning.test["item_id"]) == ["a-more", "a-next", "c-next"]
    assert list(returning.test.index) == [0, 1, 2]
    with pytest.raises(ValueError, match="no user returns 40 days"):
        validation_split(train, fraction=0.2, min_gap_days=40)
    with pytest.raises(ValueError, match="min gap"):
        validation_split(train, min_gap_days=-1)


def test_the_fingerprint_covers_user_item_time_and_nothing_else() -> None:
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 3)]
    same = log(rows)
    assert fingerprint(same) == fingerprint(log(rows).assign(extra=1).reset_index(drop=True))
    assert fingerprint(same) != fingerprint(log([*rows[:2], ("u2", "b", 3)]))  # one item
    assert fingerprint(same) != fingerprint(log([*rows[:2], ("u2", "a", 4)]))  # one time
    assert fingerprint(same) != fingerprint(log([*rows[:2], ("u3", "a", 3)]))  # one user

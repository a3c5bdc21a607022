"""Leakage-free training examples: a history holds only strictly earlier interactions."""

import numpy as np
import pandas as pd
import pytest
from trainer_helpers import fast_config, small_dataset

from models.examples import InteractionLog, encode_table, fit_encoders
from models.features import Feature, FeatureEncoder
from models.train import Trainer

ITEMS = {"i1": 0, "i2": 1, "i3": 2, "i4": 3, "i5": 4}


def interactions(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    return frame.astype({"timestamp": "int64"})


# Deliberately not in time order; "zz" is not in the catalogue.
HAND_BUILT = interactions(
    [
        ("b", "i5", 7),
        ("a", "i4", 30),
        ("a", "i1", 10),
        ("b", "i2", 5),
        ("a", "zz", 15),
        ("a", "i2", 20),
        ("b", "i1", 5),  # same time as b's i2: neither sees the other
        ("a", "i3", 20),  # same time as a's i2
    ]
)


def all_histories(log: InteractionLog, length: int) -> np.ndarray:
    return log.histories(log.history_end, log.user_start, length)


def test_hand_built_log_layout() -> None:
    log = InteractionLog.build(HAND_BUILT, ITEMS)
    assert log.user_ids == ["a", "b"]
    # Grouped by user, oldest first; ties keep log order; the unknown item is dropped.
    assert log.items.tolist() == [0, 1, 2, 3, 1, 0, 4]
    assert log.users.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert log.user_start.tolist() == [0, 0, 0, 0, 4, 4, 4]
    assert log.history_end.tolist() == [0, 1, 1, 3, 4, 4, 6]
    assert log.user_end.tolist() == [4, 7]
    assert log.item_counts(6).tolist() == [2, 2, 1, 1, 1, 0]


def test_hand_built_histories_are_strictly_earlier_and_newest_first() -> None:
    log = InteractionLog.build(HAND_BUILT, ITEMS)
    # Values are catalogue rows + 1 (0 = padding): i1 -> 1 ... i5 -> 5.
    expected = [
        [0, 0, 0],  # a@10 i1: nothing before
        [1, 0, 0],  # a@20 i2: only i1; i3 shares t=20
        [1, 0, 0],  # a@20 i3: only i1; i2 shares t=20
        [3, 2, 1],  # a@30 i4: i3, i2 (t=20, later in the log first), i1
        [0, 0, 0],  # b@5 i2
        [0, 0, 0],  # b@5 i1
        [1, 2, 0],  # b@7 i5: i1, i2 (same time, later in the log first)
    ]
    np.testing.assert_array_equal(all_histories(log, 3), expected)
    np.testing.assert_array_equal(all_histories(log, 2), [row[:2] for row in expected])
    # At prediction time a user's history is everything they did, newest first.
    np.testing.assert_array_equal(log.user_histories(3), [[4, 3, 2], [5, 1, 2]])
    np.testing.assert_array_equal(log.user_histories(5), [[4, 3, 2, 1, 0], [5, 1, 2, 0, 0]])


def test_histories_can_leave_one_event_out() -> None:
    log = InteractionLog.build(HAND_BUILT, ITEMS)
    starts = log.user_start[log.user_end - 1]
    # a's latest without its event 2 (i3): i4, i2, i1; b's without event 6 (i5): i1, i2.
    rows = log.histories(log.user_end, starts, 3, skip=np.array([2, 6]))
    np.testing.assert_array_equal(rows, [[4, 2, 1], [1, 2, 0]])
    # Skipping an event outside the window changes nothing.
    rows = log.histories(log.user_end, starts, 2, skip=np.array([0, 4]))
    np.testing.assert_array_equal(rows, [[4, 3], [5, 1]])


def test_item_counts_can_decay_with_age() -> None:
    log = InteractionLog.build(HAND_BUILT, ITEMS)
    np.testing.assert_array_equal(log.item_counts(6, 0.0), [2, 2, 1, 1, 1, 0])
    # Ages from the last event (t=30) in days; with a half-life h each counts 0.5 ** (age / h).
    day = 86400
    late = HAND_BUILT.assign(timestamp=HAND_BUILT["timestamp"] * day)
    decayed = InteractionLog.build(late, ITEMS).item_counts(6, 10.0)
    weight = {t: 0.5 ** ((30 - t) / 10) for t in (5, 7, 10, 20, 30)}
    expected = [
        weight[10] + weight[5],
        weight[20] + weight[5],
        weight[20],
        weight[30],
        weight[7],
        0,
    ]
    np.testing.assert_allclose(decayed, expected)


def test_empty_log() -> None:
    log = InteractionLog.build(interactions([("a", "zz", 1)]), ITEMS)
    assert log.items.tolist() == [] and log.user_ids == []
    assert log.user_histories(4).shape == (0, 4)


def expected_histories(events: pd.DataFrame, index: dict[str, int]) -> dict[str, list]:
    """Per user, (timestamp, item row + 1) in time order, ties in log order."""
    ordered = events.sort_values("timestamp", kind="stable")
    out: dict[str, list] = {}
    for user, item, t in ordered[["user_id", "item_id", "timestamp"]].itertuples(index=False):
        out.setdefault(user, []).append((t, index[item] + 1))
    return out


def definition(timeline: list, before: int, length: int) -> list[int]:
    """The definition, the slow way: the user's items at times < `before`, newest first."""
    rows = [row for t, row in timeline if t < before][::-1][:length]
    return rows + [0] * (length - len(rows))


@pytest.mark.parametrize("length", [5, 200])
def test_trainer_histories_match_the_definition_on_synthetic_data(length: int) -> None:
    dataset = small_dataset()
    # Coarse timestamps (weeks) create many same-time events; shuffled rows test the sorting.
    events = dataset.interactions.assign(
        timestamp=dataset.interactions["timestamp"] // (7 * 86400)
    ).sample(frac=1.0, random_state=0)
    assert events.duplicated(["user_id", "timestamp"]).sum() > 500
    trainer = Trainer(dataset, events, fast_config(history_length=length))
    log = trainer.log
    timelines = expected_histories(events, dict(trainer.user_encoder.item_index))
    when = {(u, i): t for u, i, t in events[["user_id", "item_id", "timestamp"]].itertuples(False)}
    histories = all_histories(log, length)
    assert histories.shape == (len(events), length)
    for e in range(len(log.items)):
        user = log.user_ids[log.users[e]]
        t = when[(user, trainer.item_ids[log.items[e]])]
        seen = [when[(user, trainer.item_ids[r - 1])] for r in histories[e] if r]
        assert all(s < t for s in seen)
        assert seen == sorted(seen, reverse=True)
        assert histories[e].tolist() == definition(timelines[user], t, length)
    latest = log.user_histories(length)
    for row, user in enumerate(log.user_ids):
        assert latest[row].tolist() == definition(timelines[user], 1 << 62, length)


def test_fit_encoders_use_training_users_only() -> None:
    dataset = small_dataset()
    train_users = ["u1", "u2", "u3"]
    train = dataset.interactions[dataset.interactions["user_id"].isin(train_users)]
    user_encoder, item_encoder = fit_encoders(dataset, train, history_length=7)
    countries = set(dataset.users.loc[train_users, "country"])
    assert set(user_encoder.by_name["country"].vocabulary) == countries
    assert user_encoder.history_length == 7
    assert dict(user_encoder.item_index) == {str(i): r for r, i in enumerate(dataset.items.index)}
    # Item attributes describe the whole catalogue, interacted with or not.
    categories = set(dataset.items["category"])
    assert set(item_encoder.by_name["category"].vocabulary) == categories
    assert item_encoder.history_length == 0


def test_encode_table_unknown_ids_are_missing() -> None:
    users = pd.DataFrame({"country": ["US", "FR"], "spend": [3.0, None]}, index=["a", "b"])
    encoder = FeatureEncoder(
        [
            Feature("country", "categorical", vocabulary={"US": 1, "FR": 2}),
            Feature("spend", "numeric", mean=1.0, std=2.0),
        ]
    )
    table = encode_table(encoder, users, ["b", "nobody", "a"])
    assert table["country"].tolist() == [2, 0, 1]
    assert table["spend"].tolist() == [0.0, 0.0, 1.0]

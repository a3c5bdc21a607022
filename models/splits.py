"""Train/test splits of an interaction log, named by the `--split` strings of the CLI.

Every split returns frames in the `Dataset.interactions` layout (`user_id`, `item_id`,
`timestamp`; sorted by time, stable; index 0..n-1). Rules:

- `seed-2003`: train is everything before 2003-01-01T00:00:00Z; test is everything at or
  after it, restricted to users with at least one training interaction (the protocol of the
  seed experiment).
- `last-10pct`: a time cut. With n interactions, the cut timestamp is the timestamp of the
  `round(0.1 * n)`-th interaction counted from the end; test is every interaction at or after
  the cut, so interactions sharing the cut timestamp all go to test (test may hold slightly
  more than 10 %). Test is then restricted to users seen in train; the interactions of users
  first seen after the cut are dropped from both parts.
- `leave-last-n:N`: each user's last N interactions (in time order, ties kept in log order)
  go to test; users with N or fewer interactions stay wholly in train.

`validation_split` carves a validation slice off the end of a training frame with the same
rule as `last-10pct`, so early stopping never looks at the test split. With `min_gap_days`,
it keeps only *returning* users: those whose first held-out interaction comes at least that
long after their last earlier one. A time split's test period is mostly such users (on
ML-1M `last-10pct`, 90 % come back after 14 days or more); users who merely continue the
session they were in at the cut reward what is popular that week instead.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime

import pandas as pd

SEED_2003_CUTOFF = int(datetime(2003, 1, 1, tzinfo=UTC).timestamp())
VALID_FORMS = "'seed-2003', 'last-10pct' or 'leave-last-n:N' (N >= 1)"
_LEAVE_LAST_N = re.compile(r"leave-last-n:(\d+)")
_COLUMNS = ("user_id", "item_id", "timestamp")


class NoReturningUsersError(ValueError):
    """A validation slice restricted to returning users would be empty."""


@dataclass(frozen=True)
class Split:
    """A named train/test partition of an interaction log.

    Attributes:
        name: the spec it was made from, e.g. "last-10pct" or "leave-last-n:1".
        train: interactions to learn from, in the `Dataset.interactions` layout.
        test: held-out interactions, same layout; every test user also appears in `train`.
    """

    name: str
    train: pd.DataFrame
    test: pd.DataFrame

    def summary(self) -> dict[str, int | str]:
        """Sizes of both parts and the training part's fingerprint, for logs and bundle
        manifests."""
        return {
            "split": self.name,
            "train_fingerprint": fingerprint(self.train),
            "n_train_interactions": len(self.train),
            "n_test_interactions": len(self.test),
            "n_train_users": int(self.train["user_id"].nunique()),
            "n_test_users": int(self.test["user_id"].nunique()),
        }


def fingerprint(interactions: pd.DataFrame) -> str:
    """sha256 of the (user, item, time) rows in order: `evaluate` recognises a bundle's own
    training data by it, where counts alone would take another data set of the same size."""
    rows = interactions[list(_COLUMNS)].astype({"user_id": str, "item_id": str})
    hashes = pd.util.hash_pandas_object(rows, index=False).to_numpy()
    return hashlib.sha256(hashes.tobytes()).hexdigest()


def make_split(interactions: pd.DataFrame, spec: str) -> Split:
    """Split an interaction log according to a `--split` string.

    Args:
        interactions: frame in the `Dataset.interactions` layout, (n, 3+) columns.
        spec: `seed-2003`, `last-10pct` or `leave-last-n:N`. `none` is not a split: the
            caller trains on everything instead of calling this.

    Returns:
        The `Split`, named by the normalised spec.

    Raises:
        ValueError: unknown spec, missing columns, or a cut that leaves train or test empty.

    Example:
        >>> split = make_split(dataset.interactions, "leave-last-n:1")
    """
    name = split_name(spec)
    _check_columns(interactions)
    log = _time_sorted(interactions)
    if name == "seed-2003":
        return _cut_at(log, SEED_2003_CUTOFF, name)
    if name == "last-10pct":
        return _last_fraction(log, 0.1, name)
    return _leave_last_n(log, int(name.removeprefix("leave-last-n:")), name)


def split_name(spec: str) -> str:
    """The normalised name of a `--split` spec, as `make_split` names its split: the check a
    command runs before it reads any data.

    Raises:
        ValueError: an unknown spec, or `none` (not a split).
    """
    spec = spec.strip()
    if spec in ("seed-2003", "last-10pct"):
        return spec
    match = _LEAVE_LAST_N.fullmatch(spec)
    if match is not None and int(match.group(1)) >= 1:
        return f"leave-last-n:{int(match.group(1))}"
    if spec == "none":
        raise ValueError(f"split 'none' means train on everything; expected {VALID_FORMS}")
    raise ValueError(f"unknown split {spec!r}; expected {VALID_FORMS}")


def is_next_item(spec: str) -> bool:
    """Whether `spec` is a next-item protocol (`leave-last-n:N`): each user's last items held
    out, rather than a cut in time."""
    match = _LEAVE_LAST_N.fullmatch(spec.strip())
    return match is not None and int(match.group(1)) >= 1


def validation_split(
    train: pd.DataFrame, fraction: float = 0.1, min_gap_days: float = 0.0
) -> Split:
    """Hold out the end of a training period for early stopping.

    Args:
        train: the training part of a split, `Dataset.interactions` layout.
        fraction: share of interactions (by time, from the end) to hold out, in (0, 1).
        min_gap_days: keep only the held-out interactions of users whose first held-out
            interaction comes at least this many days after their last earlier one
            (returning users); 0 keeps every user seen earlier.

    Returns:
        `Split` named "validation" whose `train` is the earlier part and whose `test` is the
        held-out slice (same cut rule as `last-10pct`, restricted to users seen earlier and,
        with `min_gap_days`, to returning users). `train` is never filtered.

    Raises:
        ValueError: bad fraction or gap; `NoReturningUsersError` when no returning user is
            left in the slice.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    if min_gap_days < 0:
        raise ValueError(f"validation min gap must be >= 0 days, got {min_gap_days}")
    _check_columns(train)
    carve = _last_fraction(_time_sorted(train), fraction, "validation")
    if min_gap_days == 0:
        return carve
    last_before = carve.train.groupby("user_id")["timestamp"].max()
    first_after = carve.test.groupby("user_id")["timestamp"].min()
    gap = first_after - last_before.reindex(first_after.index)
    returning = gap.index[gap >= min_gap_days * 86400.0]
    test = carve.test[carve.test["user_id"].isin(returning)].reset_index(drop=True)
    if test.empty:
        raise NoReturningUsersError(
            f"validation: no user returns {min_gap_days:g} days or more after the cut's "
            "earlier interactions; lower the validation min gap"
        )
    return Split(name=carve.name, train=carve.train, test=test)


def _check_columns(interactions: pd.DataFrame) -> None:
    missing = [c for c in _COLUMNS if c not in interactions.columns]
    if missing:
        raise ValueError(f"interactions lack columns {missing}")


def _time_sorted(interactions: pd.DataFrame) -> pd.DataFrame:
    # Stable, so ties keep log order; a no-op copy for frames already in Dataset order.
    return interactions.sort_values("timestamp", kind="stable").reset_index(drop=True)


def _last_fraction(log: pd.DataFrame, fraction: float, name: str) -> Split:
    n_tail = max(1, round(fraction * len(log)))
    if len(log) < 2 or n_tail >= len(log):
        raise ValueError(f"{name}: {len(log)} interactions are too few to split")
    cut = int(log["timestamp"].iloc[len(log) - n_tail])
    return _cut_at(log, cut, name)


def _cut_at(log: pd.DataFrame, cut: int, name: str) -> Split:
    before = log["timestamp"].to_numpy() < cut
    train = log[before].reset_index(drop=True)
    after = log[~before]
    test = after[after["user_id"].isin(train["user_id"].unique())].reset_index(drop=True)
    if train.empty or test.empty:
        raise ValueError(
            f"{name}: cut at timestamp {cut} leaves {len(train)} train and "
            f"{len(test)} test interactions"
        )
    return Split(name=name, train=train, test=test)


def _leave_last_n(log: pd.DataFrame, n: int, name: str) -> Split:
    by_user = log.groupby("user_id", sort=False)["user_id"]
    from_end = by_user.cumcount(ascending=False).to_numpy()
    size = by_user.transform("size").to_numpy()
    held_out = (from_end < n) & (size > n)
    train = log[~held_out].reset_index(drop=True)
    test = log[held_out].reset_index(drop=True)
    if test.empty:
        raise ValueError(f"{name}: no user has more than {n} interactions")
    return Split(name=name, train=train, test=test)

"""Training and inference inputs cut from an interaction log without leakage.

Every training example is one interaction (user, item, t); its history is the user's items
with a timestamp strictly before t, newest first. Histories are cut per batch from one flat
array instead of being materialised (B x L per example would not fit at 1M-item scale).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from models.dataset import Dataset
from models.feature_spec import HISTORY, fit_feature
from models.features import FeatureEncoder


@dataclass(frozen=True)
class InteractionLog:
    """A user-grouped, time-ordered interaction log over catalogue rows.

    Attributes:
        items: int64 `(N,)` catalogue rows, grouped by user, oldest first.
        users: int64 `(N,)` row of the user in `user_ids`.
        user_start: `(N,)` index of the first event of the same user.
        history_end: `(N,)` exclusive end of the event's history: the first event of the same
            user at the same timestamp, so simultaneous events never see each other.
        user_ids: external user ids, by user row.
        user_end: `(n_users,)` exclusive end of each user's events (their full history).
        timestamps: int64 `(N,)` time of each event (seconds).
    """

    items: np.ndarray
    users: np.ndarray
    user_start: np.ndarray
    history_end: np.ndarray
    user_ids: list[str]
    user_end: np.ndarray
    timestamps: np.ndarray

    @classmethod
    def build(cls, interactions: pd.DataFrame, item_index: Mapping[str, int]) -> InteractionLog:
        """Interactions whose item is not in `item_index` are dropped."""
        rows = interactions["item_id"].map(item_index)
        frame = interactions.assign(row=rows).dropna(subset=["row"])
        frame = frame.sort_values(["user_id", "timestamp"], kind="stable")
        codes, user_ids = pd.factorize(frame["user_id"], sort=False)
        ts = frame["timestamp"].to_numpy()
        n = len(frame)
        idx = np.arange(n)
        new_user = np.r_[True, codes[1:] != codes[:-1]] if n else np.zeros(0, bool)
        new_time = new_user | np.r_[True, ts[1:] != ts[:-1]] if n else np.zeros(0, bool)
        user_start = np.maximum.accumulate(np.where(new_user, idx, 0)) if n else idx
        history_end = np.maximum.accumulate(np.where(new_time, idx, 0)) if n else idx
        user_end = np.r_[idx[new_user][1:], n] if n else np.zeros(0, np.int64)
        return cls(
            items=frame["row"].to_numpy(np.int64),
            users=codes.astype(np.int64),
            user_start=user_start,
            history_end=history_end,
            user_ids=[str(u) for u in user_ids],
            user_end=user_end.astype(np.int64),
            timestamps=ts.astype(np.int64),
        )

    def histories(
        self, ends: np.ndarray, starts: np.ndarray, length: int, skip: np.ndarray | None = None
    ) -> np.ndarray:
        """History matrix `(B, length)`: item rows + 1 before `ends`, newest first, 0-padded
        (`history_rows` over this log's items)."""
        items, ends_t, starts_t = (as_tensor(a) for a in (self.items, ends, starts))
        skipped = None if skip is None else as_tensor(skip)
        return history_rows(items, ends_t, starts_t, length, skipped).numpy()

    def user_histories(self, length: int) -> np.ndarray:
        """Each user's latest `length` items (as of the end of the log), `(n_users, length)`."""
        first = self.user_start[self.user_end - 1] if len(self.user_end) else self.user_end
        return self.histories(self.user_end, first, length)

    def example_probabilities(self, user_balance: float, half_life_days: float = 0.0) -> np.ndarray:
        """`(N,)` probability of drawing each event as a training example: proportional to
        `(events of its user) ** -user_balance` (0: every event alike, so heavy users dominate;
        1: every user alike), times `0.5 ** (age / half_life_days)` with a half-life (its age
        from the log's last event, as `item_counts` weighs it: recent tastes weigh more)."""
        sizes = (self.user_end - self.user_start[self.user_end - 1])[self.users]
        weights = sizes.astype(np.float64) ** -user_balance
        if half_life_days > 0:
            weights *= self.recency_weights(half_life_days)
        return weights / weights.sum()

    def recency_weights(self, half_life_days: float) -> np.ndarray:
        """`(N,)` `0.5 ** (age / half_life_days)`, each event's age in days from the log's
        last event."""
        age_days = (self.timestamps.max() - self.timestamps) / 86400.0
        return np.exp2(-age_days / half_life_days)

    def draw_targets(self, events: np.ndarray, window: int, rng: np.random.Generator) -> np.ndarray:
        """The event whose item is each example's positive: the example's own (`window` 1:
        next-item prediction) or one drawn uniformly from the user's next `window` events
        from it on, the user's last event standing in for those past the end of the log."""
        if window <= 1:
            return events
        last = self.user_end[self.users[events]] - 1
        return np.minimum(events + rng.integers(0, window, size=len(events)), last)

    def target_counts(
        self, n_items: int, window: int, example_weights: np.ndarray | None = None
    ) -> np.ndarray:
        """Expected times each catalogue row is a positive when every event is an example
        `example_weights` times (default once) and `draw_targets` picks its positive: the
        frequencies logQ correction needs (with a window, a user's last items are drawn more
        often than they occur)."""
        events = np.arange(len(self.items))
        last = self.user_end[self.users] - 1
        counts = np.zeros(n_items)
        for offset in range(max(window, 1)):
            targets = np.minimum(events + offset, last)
            counts += np.bincount(self.items[targets], weights=example_weights, minlength=n_items)
        return counts / max(window, 1)

    def item_counts(self, n_items: int, half_life_days: float = 0.0) -> np.ndarray:
        """Interactions per catalogue row; with a half-life, each counts `0.5 ** (age /
        half_life)`, its age measured from the log's last event (recent popularity)."""
        if half_life_days <= 0 or not len(self.items):
            return np.bincount(self.items, minlength=n_items)
        weights = self.recency_weights(half_life_days)
        return np.bincount(self.items, weights=weights, minlength=n_items)


def fit_encoders(
    dataset: Dataset, train: pd.DataFrame, history_length: int
) -> tuple[FeatureEncoder, FeatureEncoder]:
    """Fit the user encoder (attributes of training users + history) and the item encoder."""
    item_ids = [str(i) for i in dataset.items.index]
    train_users = dataset.users.loc[dataset.users.index.isin(train["user_id"].unique())]
    user_features = [
        fit_feature(
            c.name,
            c.kind,
            train_users[c.name].tolist(),
            transform=c.transform,
            separator=c.separator,
        )
        for c in dataset.user_columns
    ]
    item_features = [
        fit_feature(
            c.name,
            c.kind,
            dataset.items[c.name].tolist(),
            transform=c.transform,
            separator=c.separator,
        )
        for c in dataset.item_columns
    ]
    item_index = {item: row for row, item in enumerate(item_ids)}
    return (
        FeatureEncoder(user_features, history_length, item_index),
        FeatureEncoder(item_features),
    )


def encode_table(
    encoder: FeatureEncoder, table: pd.DataFrame, ids: Sequence[str]
) -> dict[str, Tensor]:
    """Encode the attribute rows of `ids` (missing ids = all values missing) as tensors."""
    rows = table.reindex(pd.Index(ids))
    columns = {name: rows[name].tolist() for name in encoder.names if name in rows}
    encoded = encoder.encode_columns(columns, None, batch_size=len(ids))
    encoded.pop(HISTORY, None)
    return {name: torch.from_numpy(values) for name, values in encoded.items()}


def history_rows(
    items: Tensor, ends: Tensor, starts: Tensor, length: int, skip: Tensor | None = None
) -> Tensor:
    """History matrix `(B, length)`: the rows + 1 of `items` (a user-grouped log's, `(N,)`)
    at the events before each of `ends` and from `starts` on (`(B,)`), newest first,
    0-padded; on the device the tensors are on.

    `skip` (`(B,)` event indices) leaves one event out of each row (the older ones move up).
    """
    steps = torch.arange(length if skip is None else length + 1, device=ends.device)
    positions = ends.unsqueeze(1) - 1 - steps
    if skip is not None:
        dropped = (positions == skip.unsqueeze(1)).to(torch.uint8)
        # A stable sort of the kept positions to the front drops the skipped one.
        order = torch.argsort(dropped, dim=1, stable=True)[:, :length]
        positions = positions.gather(1, order)
    valid = positions >= starts.unsqueeze(1)
    return torch.where(valid, items[positions.clamp(min=0)] + 1, 0)


def as_tensor(array: np.ndarray) -> Tensor:
    """A tensor over `array`'s memory, copied first only when it is read-only (a pandas
    column's view), which torch cannot share."""
    return torch.from_numpy(np.require(array, requirements="W"))


def gather(table: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    return {name: values[rows] for name, values in table.items()}

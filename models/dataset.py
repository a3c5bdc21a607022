"""The in-memory dataset every source produces and every later stage consumes."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from models.feature_spec import ColumnKind, NumericTransform


class DataError(ValueError):
    """A data source is missing, malformed or inconsistent; the message says where and why."""


@dataclass(frozen=True)
class ColumnSpec:
    """How one raw user or item attribute column is turned into a model feature.

    Args:
        name: column name in `Dataset.users` / `Dataset.items`.
        kind: `categorical` (one string value), `multi_hot` (several values joined by
            `separator`, e.g. genres "Action|Comedy") or `numeric` (float).
        transform: numeric only: `standard` (z-score), `log` (log1p then z-score) or `bucket`
            (quantile buckets, then an embedding).
        separator: multi_hot only.
    """

    name: str
    kind: ColumnKind
    transform: NumericTransform = "standard"
    separator: str = "|"


@dataclass(frozen=True)
class Dataset:
    """Interactions plus user and item attribute tables.

    Attributes:
        name: the source string it was loaded from, e.g. "ml-1m:/data/ml-1m".
        interactions: columns `user_id` (str), `item_id` (str), `timestamp` (int64, Unix
            seconds, UTC), sorted by timestamp (stable), index 0..n-1. Every user and item in
            it exists in `users` / `items`.
        users: indexed by `user_id` (str), one column per `user_columns` entry (raw values:
            str for categorical/multi_hot, float for numeric; missing values are NaN/None).
        items: indexed by `item_id` (str), one column per `item_columns` entry; it is the
            item catalogue (items never interacted with may appear).
        user_columns / item_columns: how each attribute column is encoded.
        cold_users: the users of the source's users table with no interaction, as `users`.
            Training leaves them out; `publish-features` stores their features, so that the
            service serves a cold-start user by its own attributes, not the defaults.
    """

    name: str
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    user_columns: tuple[ColumnSpec, ...]
    item_columns: tuple[ColumnSpec, ...]
    cold_users: pd.DataFrame | None = None

    def item_index(self) -> dict[str, int]:
        """Each catalogue item id -> its row (the order of `items`): the column of its score."""
        return {str(item): row for row, item in enumerate(self.items.index)}

    def summary(self) -> dict[str, int | str]:
        return {
            "source": self.name,
            "n_users": len(self.users),
            "n_items": len(self.items),
            "n_interactions": len(self.interactions),
        }

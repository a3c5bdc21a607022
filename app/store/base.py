"""The online store's interface: what it holds for a user (`UserRecord`) and what it does
(`FeatureStore`): raw features and recent history, read in batches, written per user."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

StoreStatus = Literal["ok", "unavailable", "disabled"]


@dataclass(frozen=True, slots=True)
class UserRecord:
    """What the store holds for one user; `found` is False when it holds nothing."""

    features: Mapping[str, Any]
    history: tuple[str, ...]
    found: bool


EMPTY = UserRecord({}, (), False)


def parse_features(raw: str | bytes) -> dict[str, Any] | None:
    """A stored JSON object, or None when the value is not one.

    Strict JSON first (orjson, fast); then Python's parser, which also reads what other
    writers emit: `NaN` and `Infinity` (Python's own `json.dumps`, by default), numbers beyond
    a double (as infinity), lone surrogate escapes. Those values read as missing one by one
    (the encoder's rule), not the whole record with them."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON; nested beyond the parser's depth
            return None
    return value if isinstance(value, dict) else None


class FeatureStore(ABC):
    """The online store's interface (Redis, or in process when REDIS_URL is empty).

    It keeps each user's newest `history_cap` items (HISTORY_CAP) and reads all of them: every
    stored item is excluded as seen, however few of them the user tower reads (it takes the
    newest it needs, `app.retrieval.Query`).
    """

    history_cap: int

    @abstractmethod
    async def fetch_many(self, user_ids: Sequence[str]) -> dict[str, UserRecord]:
        """Records of the distinct `user_ids`, each with its stored history (newest first); a
        user on a part of the store that is unavailable (one node of a cluster) is left out,
        as a user the store does not hold. Raises FeatureStoreUnavailable when no
        part answered."""

    @abstractmethod
    async def append_events(self, user_id: str, item_ids: Sequence[str]) -> int:
        """Push `item_ids` (oldest first, so the last becomes the newest); returns the
        history length after capping. Raises FeatureStoreUnavailable."""

    @abstractmethod
    async def put_features(self, user_id: str, features: Mapping[str, Any]) -> None:
        """Replace the user's raw features. Raises FeatureStoreUnavailable."""

    @abstractmethod
    async def health(self) -> StoreStatus: ...

    async def aclose(self) -> None:
        return None

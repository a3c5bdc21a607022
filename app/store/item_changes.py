"""The item change log: items added, changed or deleted at serving time, in the order they
were made, in Redis (`item_changes_redis`) or, without Redis, in this process.

A change records the item's raw attributes, never a vector: vectors belong to one model
version, and every version embeds the item anew (`app.catalogue`). Each change gets the log's
next sequence number, so a reader asks only for what changed after the last number it read;
the log keeps the latest change of each item (a later change of an item replaces its earlier
one), so replaying it from the start costs one record per item ever changed. The log's
`epoch` names one log: a reader that finds another epoch than the one it read before knows
the log was lost or replaced (Redis flushed) and replays it from the start.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class ItemChange:
    """The latest change of one item.

    Attributes:
        item_id: the item's external id.
        seq: its number in the log (1, 2, ...; 0 until it is written).
        attributes: the item's raw attributes (name -> value); None: the item is deleted.
        at: UNIX time the change was made.
    """

    item_id: str
    seq: int
    attributes: Mapping[str, Any] | None
    at: float

    @property
    def deleted(self) -> bool:
        return self.attributes is None

    def record(self) -> bytes:
        """The stored JSON: `{"op": "put", "attributes": {...}, "at": t}` or
        `{"op": "delete", "at": t}` (the sequence number is stored beside it)."""
        if self.attributes is None:
            return orjson.dumps({"op": "delete", "at": self.at})
        return orjson.dumps({"op": "put", "attributes": dict(self.attributes), "at": self.at})

    @classmethod
    def parse(cls, item_id: str, seq: int, raw: str | bytes) -> ItemChange | None:
        """A stored record, or None when it is not one (not ours to trust: skipped)."""
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("at"), int | float):
            return None
        if value.get("op") == "delete":
            return cls(item_id, seq, None, float(value["at"]))
        attributes = value.get("attributes")
        if value.get("op") != "put" or not isinstance(attributes, dict):
            return None
        return cls(item_id, seq, attributes, float(value["at"]))


def new_change(item_id: str, attributes: Mapping[str, Any] | None) -> ItemChange:
    """A change to write (`ItemChangeLog.append` gives it its number)."""
    return ItemChange(item_id, 0, None if attributes is None else dict(attributes), time.time())


@dataclass(frozen=True, slots=True)
class ChangePage:
    """What `ItemChangeLog.read` found.

    Attributes:
        epoch: the log's epoch; None while nothing was ever written to it.
        head: the log's last sequence number.
        changes: the changes numbered after the one asked for, in order (at most the limit).
        last: the number of the last change read, one skipped as unreadable included: the
            next read asks for what comes after it.
        follows: False when the change numbered as asked is no longer the item the reader
            read there: a failover to a replica that missed the latest changes numbers new
            ones anew, under the same epoch.
    """

    epoch: str | None
    head: int
    changes: list[ItemChange]
    last: int
    follows: bool = True


class ItemChangeLog(ABC):
    """Where item changes are made durable; `shared` says whether other processes read them.
    Every call raises `app.errors.ItemChangesUnavailable` when the log cannot be reached."""

    shared: bool

    @abstractmethod
    async def append(self, change: ItemChange) -> tuple[str, ItemChange]:
        """Write `change` as the item's latest: (the log's epoch, the change numbered)."""

    @abstractmethod
    async def read(self, after: int, limit: int, last_item: str | None = None) -> ChangePage:
        """The latest changes numbered after `after`, at most `limit` of them, in order;
        `last_item`: the item whose change the reader read as number `after`, if it knows it
        (`ChangePage.follows` says whether the log still holds it there)."""

    async def aclose(self) -> None:
        return None


class MemoryItemChangeLog(ItemChangeLog):
    """REDIS_URL empty: the changes of this process alone, lost when it stops."""

    shared = False

    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex
        self._seq = 0
        # Latest change per item, in sequence order (a re-changed item moves to the end).
        self._latest: dict[str, ItemChange] = {}

    async def append(self, change: ItemChange) -> tuple[str, ItemChange]:
        self._seq += 1
        numbered = ItemChange(change.item_id, self._seq, change.attributes, change.at)
        self._latest.pop(change.item_id, None)
        self._latest[change.item_id] = numbered
        return self.epoch, numbered

    async def read(self, after: int, limit: int, last_item: str | None = None) -> ChangePage:
        # `last_item` is not checked: a log in this process never loses a change it gave.
        newer: list[ItemChange] = []
        for change in reversed(self._latest.values()):
            if change.seq <= after:
                break
            newer.append(change)
        newer = newer[::-1][:limit]
        last = newer[-1].seq if newer else after
        return ChangePage(self.epoch if self._seq else None, self._seq, newer, last)

"""`ChangeSet`: this worker's copy of the item change log, the latest change of each item.

Immutable: a read of the log makes a new one, so a model load in a worker thread reads one
consistent set while the event loop moves on. Its `revision` grows with every new set, and an
overlay records the revision it reflects (`app.search.overlay.ItemOverlay.revision`): a model
whose overlay has another revision than the current set is behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from app.store import ChangePage, ItemChange


@dataclass(frozen=True)
class ChangeSet:
    """The latest change of each item, as far as this worker has read the log.

    Attributes:
        items: item id -> its latest change.
        epoch: the log's epoch (`app.store.item_changes`); None before a change was read.
        seq: the number of the last change read: the next read asks for what follows it.
        revision: grows by one with every new set (never reset, even by a replay).
        last_item: the item of change `seq`, when it was read (the log checks it still is).
    """

    items: Mapping[str, ItemChange]
    epoch: str | None
    seq: int
    revision: int
    last_item: str | None = None

    @classmethod
    def empty(cls, revision: int = 0, epoch: str | None = None) -> ChangeSet:
        return cls({}, epoch, 0, revision)

    def is_other_log(self, page: ChangePage) -> bool:
        """Whether `page` comes from another log than the one read so far (Redis lost or
        replaced it): then it is replayed from the start and what it lacks is forgotten."""
        if self.epoch is None:
            return self.seq > 0 and page.epoch is not None
        return page.epoch != self.epoch or page.head < self.seq or not page.follows

    def merged(self, epoch: str | None, changes: Iterable[ItemChange], last: int) -> ChangeSet:
        """This set with `changes` applied (an older number than an item's known change is
        ignored: a write and a read may deliver the same change twice)."""
        items = dict(self.items)
        last_item = self.last_item if last <= self.seq else None
        for change in changes:
            known = items.get(change.item_id)
            if known is None or known.seq < change.seq:  # as `is_new`, within this batch
                items[change.item_id] = change
            if change.seq == last > self.seq:
                last_item = change.item_id
        return ChangeSet(items, epoch, max(self.seq, last), self.revision + 1, last_item)

    def is_new(self, change: ItemChange) -> bool:
        """Whether `change` is newer than this set's change of its item (what `merged`
        applies)."""
        known = self.items.get(change.item_id)
        return known is None or known.seq < change.seq

    def tag(self, change: ItemChange) -> str:
        """What identifies `change` across replays (a replayed log numbers its changes anew)."""
        return f"{self.epoch}:{change.seq}"

"""`ItemCatalogue`: items added, changed and deleted at serving time, without retraining.

A write (`put`, `delete`) is made durable in the item change log first (Redis, or this process
without Redis), then this worker reads the log and serves what it read before answering. Every
worker reads the log on a timer (RELOAD_POLL_S), so the others follow within that; a worker
that starts replays the log before its first model serves, and every newly loaded model gets
the log as it is then (the model hook `prepare` reads it, `rebase` adds what came at the swap),
so changes outlive reloads and restarts, and reach a worker without the timer (RELOAD_POLL_S
0) at its next load. What a change does to a model is `app.catalogue.apply`'s rule.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import anyio.to_thread

from app.background import stop_task
from app.catalogue.apply import apply_changes
from app.catalogue.changes import ChangeSet
from app.catalogue.state import ItemState, item_state
from app.errors import InvalidInput, ItemChangesUnavailable, ItemNotFound, ItemTowerUnavailable
from app.metrics import Metrics
from app.model import ModelRepository, ServingModel
from app.model.value_checks import attribute_errors
from app.store import ItemChange, ItemChangeLog, new_change

log = logging.getLogger(__name__)

PAGE = 1000  # changes per read of the log
LOGGED_CHANGES = 100  # a read bringing more (a replay) logs one line, not one per change


class ItemCatalogue:
    """Args:
    repository: serves the model the changes are applied to (`ModelRepository.update`).
    changes_log: where changes are made durable and read back.
    metrics: changes applied, overlay size.
    poll_s: how often the log is read for other workers' changes; 0: only on writes.
    """

    def __init__(
        self,
        repository: ModelRepository,
        changes_log: ItemChangeLog,
        metrics: Metrics,
        poll_s: float,
    ) -> None:
        self.repository = repository
        self.changes_log = changes_log
        self.metrics = metrics
        self.poll_s = poll_s
        self._changes = ChangeSet.empty()
        self._lock = asyncio.Lock()  # one read of the log at a time, in number order
        self._replayed = asyncio.Event()  # the start-up read succeeded or failed
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._down = False

    @property
    def changes(self) -> ChangeSet:
        return self._changes

    def start(self) -> None:
        """Replay the log, then read it every `poll_s` (when other processes write it)."""
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="item-changes")

    async def _run(self) -> None:
        try:
            await self.refresh()
        except ItemChangesUnavailable:
            pass  # logged by refresh; the watcher tries again
        except Exception:  # as in the watcher: a bug must not leave the worker without one
            log.exception("item change replay failed")
        finally:
            self._replayed.set()
        if self.poll_s <= 0 or not self.changes_log.shared:
            return
        while not self._stopping.is_set():
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except ItemChangesUnavailable:
                pass
            except Exception:  # a bug must not stop this worker from following changes
                log.exception("item change watcher step failed")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task, self._stopping)
            self._task = None
        await self.changes_log.aclose()

    # The repository's model hook (`app.model.repository.ModelHook`).

    async def prepare(self, model: ServingModel) -> ServingModel:
        """A loaded model with every change in the log (the start-up replay awaited, the log
        read again: a worker without the timer, or whose replay failed, catches up here; what
        it cannot read it serves as it last read)."""
        await self._replayed.wait()
        try:
            await self.refresh()
        except ItemChangesUnavailable:
            pass  # logged by refresh
        except Exception:  # never refuse a bundle for its overlay (as below)
            log.exception("item change read failed")
        try:
            return await anyio.to_thread.run_sync(apply_changes, model, self._changes)
        except Exception:  # never refuse a bundle for its overlay: it serves, unchanged
            log.exception("cannot apply item changes to bundle %s", model.version)
            return model

    def rebase(self, model: ServingModel) -> ServingModel:
        """At the swap: what changed since `prepare` (usually nothing)."""
        try:
            model = apply_changes(model, self._changes)
        except Exception:
            log.exception("cannot apply item changes to bundle %s", model.version)
        self.metrics.set_overlay(len(model.overlay), len(model.overlay.masked))
        return model

    # Writes and reads of items.

    async def put(self, item_id: str, attributes: Mapping[str, Any]) -> ItemState:
        """Add or change an item (durable, then served here).

        Raises:
            ModelNotReady: no model serves to check the attributes against.
            ItemTowerUnavailable: the serving bundle cannot embed items (format 1).
            InvalidInput: an attribute its item tower does not read, or a wrong-typed value.
            ItemChangesUnavailable: the log cannot be written: nothing changed.
        """
        model = self.repository.require()
        if model.item_encoder is None:
            raise ItemTowerUnavailable(
                f"bundle {model.version} has no item tower (bundle format 1), so items "
                "cannot be added; serve a bundle exported by the current trainer"
            )
        errors = attribute_errors(model.item_encoder, [attributes], ("body", "attributes"))
        for error in errors:
            del error["loc"][2]  # the row number of a batch: one item here
        if errors:
            raise InvalidInput(errors)
        return await self._write(new_change(item_id, attributes))

    async def delete(self, item_id: str) -> ItemState:
        """Make an item never returned (a catalogue item, an added one, or one a later bundle
        may bring): durable, then served here. Raises ItemChangesUnavailable."""
        return await self._write(new_change(item_id, None))

    def get(self, item_id: str) -> ItemState:
        """How this worker serves `item_id`. Raises ItemNotFound: no such item."""
        state = item_state(self.repository.current, self._changes, item_id)
        if state is None:
            raise ItemNotFound(f"no item {item_id!r} in the catalogue or its changes")
        return state

    async def _write(self, change: ItemChange) -> ItemState:
        try:
            epoch, written = await self.changes_log.append(change)
        except ItemChangesUnavailable as exc:
            self.metrics.redis_errors.labels("item_change_write").inc()
            log.warning("item change of %r refused: %s", change.item_id, exc.detail)
            raise
        await self.refresh(own=(epoch, written))
        return self.get(change.item_id)

    async def refresh(self, own: tuple[str, ItemChange] | None = None) -> None:
        """Read what the log holds past what this worker read, and serve it. `own`: a change
        this worker just wrote, served even if the read fails.

        Raises:
            ItemChangesUnavailable: the log cannot be read (and there was no `own` change).
        """
        async with self._lock:
            previous = self._changes
            try:
                changes, fresh = await self._read(previous)
            except ItemChangesUnavailable as exc:
                self._note_down(exc)
                if own is None:
                    raise
                changes, fresh = self._with_own(previous, own)
            else:
                self._note_up()
                if own is not None and changes.is_new(own[1]):
                    changes, mine = self._with_own(changes, own)
                    fresh += mine
            self._changes = changes
            await self._serve()
            self._record(fresh)

    async def _read(self, changes: ChangeSet) -> tuple[ChangeSet, list[ItemChange]]:
        fresh: list[ItemChange] = []
        while True:
            page = await self.changes_log.read(changes.seq, PAGE, changes.last_item)
            if changes.is_other_log(page):
                log.warning(
                    "the item change log was lost, replaced or rolled back (epoch %s, now %s): "
                    "replaying it",
                    changes.epoch,
                    page.epoch,
                )
                changes, fresh = ChangeSet.empty(changes.revision + 1, page.epoch), []
                continue
            if not page.changes and page.last <= changes.seq:
                return changes, fresh
            # A change this worker served as its own before reading it back is not new.
            fresh += [change for change in page.changes if changes.is_new(change)]
            changes = changes.merged(page.epoch, page.changes, page.last)
            if page.last >= page.head:
                return changes, fresh

    @staticmethod
    def _with_own(
        changes: ChangeSet, own: tuple[str, ItemChange]
    ) -> tuple[ChangeSet, list[ItemChange]]:
        """`changes` with this worker's own write (its number does not move the read cursor:
        the changes numbered before it are still to be read)."""
        epoch, change = own
        if changes.epoch is not None and changes.epoch != epoch:
            return changes, []  # another log since: the next read replays it, this included
        return changes.merged(epoch, [change], changes.seq), [change]

    async def _serve(self) -> None:
        """Serve the current changes: a new overlay built off the event loop, swapped in as one
        reference (with anything that changed meanwhile, `rebase`)."""
        model = self.repository.current
        if model is None or model.overlay.revision == self._changes.revision:
            return
        built = await anyio.to_thread.run_sync(apply_changes, model, self._changes)
        self.repository.update(lambda now: self.rebase(built if now is model else now))

    def _record(self, fresh: Sequence[ItemChange]) -> None:
        for change in fresh:
            self.metrics.child(self.metrics.item_changes, _op(change)).inc()
        model = self.repository.current
        version = model.version if model is not None else None
        if len(fresh) > LOGGED_CHANGES:
            log.info("item changes applied: %d changes, model_version=%s", len(fresh), version)
            return
        for change in fresh:
            state = item_state(model, self._changes, change.item_id)
            log.info(
                "item change applied: item_id=%s op=%s seq=%d status=%s model_version=%s",
                change.item_id,
                _op(change),
                change.seq,
                state.status if state is not None else None,
                version,
            )

    def _note_down(self, exc: ItemChangesUnavailable) -> None:
        self.metrics.redis_errors.labels("item_change_read").inc()
        if not self._down:
            log.warning("cannot read the item change log: %s", exc.detail)
        self._down = True

    def _note_up(self) -> None:
        if self._down:
            log.warning("the item change log is readable again")
        self._down = False


def _op(change: ItemChange) -> str:
    return "delete" if change.deleted else "put"

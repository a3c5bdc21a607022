"""The model repository: holds ONE reference to the serving model and swaps it.

Loading (`ServingModel.load`: verify, towers load, index build, warm-up) runs in a worker
thread; the swap is a single attribute assignment on the event loop, so a request that read
`current` keeps the model it read until it finishes, and the live index is never mutated. The
service is ready while a model serves. Which version to load, and when, is `app.model.sync`'s
business. Load outcomes and the serving model's gauges are recorded here, and only here.

Item changes made at serving time (`app.catalogue`) reach every model through a `ModelHook`:
`prepare` applies them to a loaded model before it may serve (off the request path), `rebase`
once more at the swap (what changed meanwhile), and `update` serves the current model with
newer changes, again as one reference assignment.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio.to_thread

from app.config import IndexConfig
from app.errors import BundleRejected, InvalidInput, ModelNotReady, VersionNotFound, input_error
from app.metrics import Metrics
from app.model.serving_model import ServingModel
from app.search.ann_cache import prune
from models.bundle import BundleError, list_versions, read_latest, version_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Swap:
    current: ServingModel
    previous: ServingModel | None


class ModelHook(Protocol):
    """What a model gets before it serves (the catalogue's changes); neither call should
    raise: a hook that cannot apply its part logs why and returns the model as it got it (a
    `prepare` that raises all the same refuses the bundle, as a failed load does)."""

    async def prepare(self, model: ServingModel) -> ServingModel:
        """A loaded model, before the swap: may take long (runs off the request path)."""
        ...

    def rebase(self, model: ServingModel) -> ServingModel:
        """At the swap, on the event loop: only what changed since `prepare`, so quick."""
        ...


class ModelRepository:
    """Args:
    root: MODEL_DIR, the artifacts directory.
    index_config: which FAISS index to build.
    metrics: load outcomes and the model gauges are recorded here.
    """

    def __init__(self, root: Path, index_config: IndexConfig, metrics: Metrics) -> None:
        self.root = root
        self.index_config = index_config
        self.metrics = metrics
        self._current: ServingModel | None = None
        self._not_ready_reason = "no model loaded yet"
        self._hooks: list[ModelHook] = []

    def attach(self, hook: ModelHook) -> None:
        """Apply `hook` to every model loaded from now on, after those attached before
        (services.py wires the catalogue, the filter warm-up, then the history read)."""
        self._hooks.append(hook)

    @property
    def current(self) -> ServingModel | None:
        return self._current

    def require(self) -> ServingModel:
        """The serving model; read it once per request.

        Raises:
            ModelNotReady: none serves (yet, or the start-up load failed), with the reason.
        """
        model = self._current
        if model is None:
            raise ModelNotReady(self._not_ready_reason)
        return model

    def resolve(self, version: str) -> Path:
        """The directory of `version`, never outside the root."""
        try:
            path = version_dir(self.root, version)
        except BundleError as exc:
            loc = ("body", "version")
            raise InvalidInput([input_error(loc, str(exc), version, "invalid_version")]) from exc
        try:
            found = path.is_dir()
        except OSError as exc:  # e.g. MODEL_DIR not searchable by this user
            raise VersionNotFound(f"cannot look up {version!r} in MODEL_DIR: {exc}") from exc
        if not found:
            raise VersionNotFound(f"no bundle version {version!r} in MODEL_DIR")
        return path

    def mark_not_ready(self, reason: str) -> None:
        """The 503 detail while nothing serves (e.g. why the start-up load failed)."""
        self._not_ready_reason = reason

    def read_latest(self) -> str:
        """What LATEST names. Raises VersionNotFound when it is missing, unreadable or
        invalid."""
        try:
            return read_latest(self.root)
        except BundleError as exc:
            raise VersionNotFound(str(exc)) from exc
        except (OSError, ValueError) as exc:  # not ours to read, not text, a failing volume
            raise VersionNotFound(f"cannot read LATEST: {type(exc).__name__}: {exc}") from exc

    async def load(self, version: str) -> ServingModel:
        """Verify, load, index and warm up `version` in a worker thread; nothing is swapped.

        Raises:
            InvalidInput: `version` is not a version name.
            VersionNotFound: no such version directory.
            BundleRejected: verification, loading or warm-up failed, or anything else went
                wrong while loading.
        """
        path = self.resolve(version)
        try:
            model = await anyio.to_thread.run_sync(self._load, path)
            for hook in self._hooks:  # a hook that fails refuses the bundle, as a failed load
                model = await hook.prepare(model)
        except Exception as exc:
            if isinstance(exc, BundleRejected):
                reason = str(exc.detail)
                log.warning("bundle %s rejected: %s", path.name, reason)
            else:  # what the loader did not foresee (out of memory, a failing volume...)
                reason = f"{type(exc).__name__}: {exc}"
                log.exception("bundle %s failed to load", path.name)
            self._count_load("rejected")
            raise BundleRejected(f"bundle {path.name} rejected: {reason}") from exc
        return model

    def _load(self, path: Path) -> ServingModel:
        model = ServingModel.load(path, self.index_config)
        root = self.index_config.cache_root
        if root is not None:
            try:
                kept = list_versions(self.root)
            except OSError:
                kept = []
            if model.version in kept:  # a listing that misses the bundle just read is not one
                prune(root, kept)
        return model

    def swap(self, model: ServingModel) -> Swap:
        """Serve `model` from now on: one reference assignment on the event loop."""
        for hook in self._hooks:
            model = hook.rebase(model)
        previous, self._current = self._current, model
        # What is alive now (torch, FAISS, FastAPI, this bundle: ~250k objects) lives as long
        # as the process: move it out of the collector's reach, or each full collection walks
        # it (~140 ms here, a pause for every request in flight: the p99 tail). Collecting
        # first keeps garbage out of the frozen set; past the first swap it walks only what
        # is new. The previous model is still freed, by reference counting, once unused.
        gc.collect()
        gc.freeze()
        self._count_load("loaded", model)
        log.info("serving bundle %s (%s index)", model.version, model.index_type)
        return Swap(model, previous)

    def update(self, change: Callable[[ServingModel], ServingModel]) -> ServingModel | None:
        """Serve `change(current)` (the same version with other item changes applied) from
        now on, as one reference assignment on the event loop: a request that read the current
        model keeps it. Not a load: nothing is counted. None while no model serves."""
        current = self._current
        if current is None:
            return None
        self._current = updated = change(current)
        return updated

    def _count_load(self, outcome: str, serving: ServingModel | None = None) -> None:
        """A load's outcome (`rejected`, or `loaded` once it serves) and the serving gauges."""
        self.metrics.reloads.labels(outcome).inc()
        if serving is not None:
            index = serving.index
            self.metrics.set_model(serving.version, serving.n_items, index.filter_index_count())
            index.watch_filter_indexes(self.metrics.filter_indexes.set)

    def versions(self) -> list[str]:
        try:
            return list_versions(self.root)
        except OSError as exc:  # MODEL_DIR unreadable: nothing to list, not a server error
            log.warning("cannot list MODEL_DIR: %s", exc)
            return []

    def latest(self) -> str | None:
        try:
            return self.read_latest()
        except VersionNotFound:
            return None

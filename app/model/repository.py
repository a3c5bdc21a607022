"""The model repository: holds ONE reference to the serving model and swaps it.

Loading (`ServingModel.load`: verify, TorchScript load, index build, warm-up) runs in a worker
thread; the swap is a single attribute assignment on the event loop, so a request that read
`current` keeps the model it read until it finishes, and the live index is never mutated. The
service is ready while a model serves. Which version to load, and when, is `app.model.sync`'s
business. Load outcomes and the serving model's gauges are recorded here, and only here.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from app.config import IndexConfig
from app.errors import BundleRejected, InvalidInput, ModelNotReady, VersionNotFound, input_error
from app.metrics import Metrics
from app.model.serving_model import ServingModel
from models.bundle import BundleError, list_versions, read_latest, version_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Swap:
    current: ServingModel
    previous: ServingModel | None


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

    @property
    def current(self) -> ServingModel | None:
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

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
            return await anyio.to_thread.run_sync(ServingModel.load, path, self.index_config)
        except Exception as exc:
            if isinstance(exc, BundleRejected):
                reason = str(exc.detail)
                log.warning("bundle %s rejected: %s", path.name, reason)
            else:  # what the loader did not foresee (out of memory, a failing volume...)
                reason = f"{type(exc).__name__}: {exc}"
                log.exception("bundle %s failed to load", path.name)
            self._count_load("rejected")
            raise BundleRejected(f"bundle {path.name} rejected: {reason}") from exc

    def swap(self, model: ServingModel) -> Swap:
        """Serve `model` from now on: one reference assignment on the event loop."""
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

    def _count_load(self, outcome: str, serving: ServingModel | None = None) -> None:
        """A load's outcome (`rejected`, or `loaded` once it serves) and the serving gauges."""
        self.metrics.reloads.labels(outcome).inc()
        if serving is not None:
            self.metrics.set_model(serving.version, serving.n_items)

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

"""The model repository: holds ONE reference to the serving bundle and swaps it on reload.

Loading (verify, TorchScript load, index build, warm-up) runs in a worker thread; the swap is a
single attribute assignment on the event loop, so a request that read `current` keeps the
bundle it read until it finishes, and the live index is never mutated.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from app.bundle_loader import IndexConfig, ServingBundle, load_bundle
from app.errors import BundleRejected, InvalidInput, ModelNotReady, VersionNotFound, input_error
from app.metrics import Metrics
from models.bundle import BundleError, list_versions, read_latest, version_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Swap:
    current: ServingBundle
    previous: ServingBundle | None


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
        self._current: ServingBundle | None = None
        self._not_ready_reason = "no model loaded yet"
        self._lock = asyncio.Lock()

    @property
    def current(self) -> ServingBundle | None:
        return self._current

    def require(self) -> ServingBundle:
        """The serving bundle; read it once per request."""
        bundle = self._current
        if bundle is None:
            raise ModelNotReady(self._not_ready_reason)
        return bundle

    def resolve(self, version: str | None) -> Path:
        """The directory of `version` (default: what LATEST names), never outside the root."""
        if version is None:
            try:
                version = read_latest(self.root)
            except BundleError as exc:
                raise VersionNotFound(str(exc)) from exc
        try:
            path = version_dir(self.root, version)
        except BundleError as exc:
            loc = ("body", "version")
            raise InvalidInput([input_error(loc, str(exc), version, "invalid_version")]) from exc
        if not path.is_dir():
            raise VersionNotFound(f"no bundle version {version!r} in MODEL_DIR")
        return path

    async def load_initial(self) -> None:
        """Start-up load of LATEST; failure leaves the service up but not ready."""
        try:
            await self.reload(None)
        except (BundleRejected, VersionNotFound) as exc:
            self._not_ready_reason = f"no model loaded: {exc.detail}"
            log.error("start-up model load failed: %s", exc.detail)

    async def reload(self, version: str | None) -> Swap:
        """Load `version` (default LATEST) off the event loop, then swap it in.

        Raises:
            InvalidInput: `version` is not a version name.
            VersionNotFound: no such version directory.
            BundleRejected: verification, loading or warm-up failed; nothing changed.
        """
        async with self._lock:  # one load at a time: they are heavy and the last must win
            path = self.resolve(version)
            try:
                bundle = await anyio.to_thread.run_sync(load_bundle, path, self.index_config)
            except BundleRejected as exc:
                self.metrics.reloads.labels("rejected").inc()
                log.warning("bundle %s rejected: %s", path.name, exc.detail)
                raise BundleRejected(f"bundle {path.name} rejected: {exc.detail}") from exc
            previous, self._current = self._current, bundle
            self.metrics.reloads.labels("loaded").inc()
            self.metrics.set_model(bundle.version, bundle.n_items)
            log.info("serving bundle %s (%s index)", bundle.version, bundle.index_type)
            return Swap(bundle, previous)

    def versions(self) -> list[str]:
        return list_versions(self.root)

    def latest(self) -> str | None:
        try:
            return read_latest(self.root)
        except BundleError:
            return None

"""Which bundle version every worker process and every replica serves, and how they converge.

The fleet's *desired* version is the pinned one if there is a pin, else what `MODEL_DIR/LATEST`
names. The pin is set by `POST /admin/reload {"version": V}` and cleared by a reload without a
version; with Redis it lives in one key, `{REDIS_PREFIX}:model:pinned`, so every worker of every
replica reads the same pin (one that starts later, too); without Redis it is this process's own.
Each worker runs a watcher that reads LATEST and the pin every RELOAD_POLL_S seconds and loads
the desired version when it serves another one. A key polled with the LATEST file, rather than
a pub/sub message, cannot be missed by a worker that was restarting or not yet started.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import anyio.to_thread

from app.background import stop_task
from app.errors import AppError, BundleRejected, FleetUnavailable, VersionNotFound
from app.model.repository import ModelRepository, Swap
from app.model.version_pin import PinUnavailable, VersionPin

log = logging.getLogger(__name__)

# A version that failed to load is tried again after this long, doubling up to the cap: a bad
# bundle never reloads in a tight loop, and a transient failure (a slow volume) still heals.
RETRY_FIRST_S = 30.0
RETRY_MAX_S = 600.0


@dataclass(frozen=True)
class LoadFailure:
    version: str | None  # None: the desired version itself is unknown (no LATEST)
    reason: str
    attempts: int
    retry_at: float


class ModelSync:
    """Keeps this worker on the desired version: at start-up, on a timer, and on admin reloads.

    Args:
        repository: loads and swaps models.
        pin: the pinned version's store.
        poll_s: watcher period in seconds; 0 = no watcher.
    """

    def __init__(self, repository: ModelRepository, pin: VersionPin, poll_s: float) -> None:
        self.repository = repository
        self.pin = pin
        self.poll_s = poll_s
        self._pinned: str | None = None  # last known pin: kept while the pin cannot be read
        self._pin_down = False
        self._failure: LoadFailure | None = None
        self._lock = asyncio.Lock()  # one load at a time: they are heavy and the last must win
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._first_load_done = asyncio.Event()  # the start-up load succeeded or failed

    @property
    def pinned(self) -> str | None:
        return self._pinned

    @property
    def error(self) -> str | None:
        """Why the desired version is not serving (None when it is)."""
        return self._failure.reason if self._failure else None

    def start(self) -> None:
        """Load the desired version, then watch, in the background: the server listens
        meanwhile (live, not ready), so probes and /metrics answer during a long index build,
        and a failed load leaves the process up, not ready."""
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="model-sync")

    async def first_load(self) -> None:
        """Wait for the start-up load to succeed or fail."""
        await self._first_load_done.wait()

    async def _run(self) -> None:
        try:
            await self.sync()
            if self.repository.current is None:
                log.error("start-up model load failed: %s", self.error)
        except Exception:  # as in _watch: a bug must not leave the worker without a watcher
            log.exception("start-up model load failed")
        finally:
            self._first_load_done.set()
        if self.poll_s > 0:
            await self._watch()

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task, self._stopping)
            self._task = None
        await self.pin.aclose()

    async def _watch(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(self.poll_s)
            try:
                await self.sync()
            except Exception:  # a bug must not stop this worker from ever reloading again
                log.exception("model watcher step failed")

    async def _read_pin(self) -> str | None:
        try:
            self._pinned = await self.pin.get()
        except PinUnavailable as exc:
            if not self._pin_down:
                log.warning("pinned version unreadable, keeping %r: %s", self._pinned, exc)
            self._pin_down = True
        else:
            if self._pin_down:
                log.warning("pinned version readable again")
            self._pin_down = False
        return self._pinned

    async def sync(self) -> None:
        """One watcher step: load the desired version if this worker serves another one.

        A failure is recorded (readiness and /admin/models show it) and that version is tried
        again only after a back-off; the current bundle, if any, keeps serving."""
        async with self._lock:
            try:
                version = await self._read_pin()
                if version is None:
                    version = await self._read_latest()
            except VersionNotFound as exc:
                self._failed(None, exc)
                return
            current = self.repository.current
            if current is not None and current.version == version:
                self._failure = None
                return
            failure = self._failure
            if failure and failure.version == version and time.monotonic() < failure.retry_at:
                return
            try:
                self.repository.swap(await self.repository.load(version))
            except (BundleRejected, VersionNotFound) as exc:
                self._failed(version, exc)
            else:
                self._failure = None

    async def _read_latest(self) -> str:
        """What LATEST names, read in a thread: a hung volume must not stall the event loop."""
        return await anyio.to_thread.run_sync(self.repository.read_latest)

    def _failed(self, version: str | None, exc: AppError) -> None:
        reason = str(exc.detail)
        previous = self._failure
        same = previous is not None and previous.version == version
        attempts = previous.attempts + 1 if previous and same else 1
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (attempts - 1))
        self._failure = LoadFailure(version, reason, attempts, time.monotonic() + delay)
        if self.repository.current is None:
            self.repository.mark_not_ready(f"no model loaded: {reason}")
        # The start-up load's failure is logged by _run, once.
        if self._first_load_done.is_set() and (previous is None or previous.reason != reason):
            log.error("cannot serve the desired model version: %s", reason)

    async def reload(self, version: str | None) -> Swap:
        """POST /admin/reload: make `version` (None: what LATEST names) the fleet's version.

        This worker loads and verifies it first, so a bad bundle is refused here, before any
        other worker hears of it; then the pin is published (set, or cleared for None) and the
        bundle swapped in. Other workers follow within RELOAD_POLL_S plus their load time.

        Raises:
            InvalidInput, VersionNotFound, BundleRejected: as ModelRepository.load.
            FleetUnavailable: the pin could not be published; nothing changed.
        """
        async with self._lock:
            target = await self._read_latest() if version is None else version
            current = self.repository.current
            if current is not None and current.version == target:
                # Served already, but the fleet must be able to load it (404 when it is gone).
                await anyio.to_thread.run_sync(self.repository.resolve, target)
                await self._publish(version)
                return Swap(current, current)
            model = await self.repository.load(target)
            await self._publish(version)
            return self.repository.swap(model)

    async def _publish(self, version: str | None) -> None:
        try:
            await self.pin.set(version)
        except PinUnavailable as exc:
            raise FleetUnavailable(
                f"cannot publish the version to the other workers ({exc}); nothing changed"
            ) from exc
        self._pinned, self._failure = version, None

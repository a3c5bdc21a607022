"""Where the fleet's pinned version lives: one Redis key that every worker of every replica
reads (`{REDIS_PREFIX}:model:pinned`), or, without Redis, this process alone."""

from __future__ import annotations

from abc import ABC, abstractmethod

from app.config import RedisConfig
from app.store.redis_client import control_call, control_client
from models.bundle import is_version_name


class PinUnavailable(Exception):
    """The shared pin cannot be read or written (Redis down or slow)."""


class VersionPin(ABC):
    """Where the pinned version lives; `shared` says whether other processes see it."""

    shared: bool

    @abstractmethod
    async def get(self) -> str | None:
        """The pinned version, None when none. Raises PinUnavailable."""

    @abstractmethod
    async def set(self, version: str | None) -> None:
        """Pin `version` (None: unpin, follow LATEST). Raises PinUnavailable."""

    async def aclose(self) -> None:
        return None


class LocalPin(VersionPin):
    """REDIS_URL empty: a pin reaches only this process (documented in the README)."""

    shared = False

    def __init__(self) -> None:
        self._version: str | None = None

    async def get(self) -> str | None:
        return self._version

    async def set(self, version: str | None) -> None:
        self._version = version


class RedisPin(VersionPin):
    """One Redis key read by every worker. Control-plane calls, off the request path, so a
    timeout of a second or so costs no request anything."""

    shared = True

    def __init__(self, config: RedisConfig) -> None:
        # One key: any node of a cluster, as its slot says.
        self.key = f"{config.prefix}:model:pinned"
        self.timeout_s = config.control_timeout_s
        self.client = control_client(config)

    async def get(self) -> str | None:
        value = await control_call(self.client.get(self.key), self.timeout_s, PinUnavailable)
        if value is None or not isinstance(value, str) or not is_version_name(value):
            return None  # absent, or not ours to trust: follow LATEST
        return value

    async def set(self, version: str | None) -> None:
        client, key = self.client, self.key
        write = client.delete(key) if version is None else client.set(key, version)
        await control_call(write, self.timeout_s, PinUnavailable)

    async def aclose(self) -> None:
        await self.client.aclose()


def build_pin(redis: RedisConfig | None) -> VersionPin:
    """The pin every worker shares through Redis, else this process's own."""
    return LocalPin() if redis is None else RedisPin(redis)

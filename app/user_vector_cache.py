"""The user-vector cache: each user's last encoded vector, reused while the model version and
the user's features and history are unchanged (VECTOR_CACHE_SIZE)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from app.metrics import Metrics


class UserVectorCache:
    """Each user's last encoded vector, keyed by a digest of exactly what was encoded.

    The tower is a pure function of (model version, merged features, history), so a vector
    is reused only when all three are the same as when it was encoded: a new event or feature
    write (by this worker or any other), request overrides and a model reload each change
    the digest, and the stale entry is simply replaced. Nothing needs invalidating, and a
    stored vector can never answer for other inputs (BLAKE2b-128 over the canonical JSON).
    One entry per user, least recently used evicted beyond `size` (~0.5 kB each).
    """

    def __init__(self, size: int, metrics: Metrics) -> None:
        self.size = size
        self.metrics = metrics
        self._data: OrderedDict[str, tuple[bytes, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()  # used from the recall thread; cheap when uncontended

    @staticmethod
    def key(version: str, features: Mapping[str, Any], history: Sequence[str]) -> bytes | None:
        """The digest of one encoding's inputs; None for inputs that cannot be keyed."""
        try:
            payload = orjson.dumps([version, features, list(history)], option=orjson.OPT_SORT_KEYS)
        except TypeError:  # orjson.JSONEncodeError: not JSON data (never from HTTP or Redis)
            return None
        return hashlib.blake2b(payload, digest_size=16).digest()

    def get(self, user_id: str, key: bytes) -> np.ndarray | None:
        with self._lock:
            entry = self._data.get(user_id)
            if entry is None or entry[0] != key:
                self.metrics.child(self.metrics.vector_cache, "miss").inc()
                return None
            self._data.move_to_end(user_id)
        self.metrics.child(self.metrics.vector_cache, "hit").inc()
        return entry[1]

    def put(self, user_id: str, key: bytes, vector: np.ndarray) -> None:
        with self._lock:
            self._data[user_id] = (key, vector)
            self._data.move_to_end(user_id)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

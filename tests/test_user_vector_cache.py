"""`UserVectorCache`: keyed by exactly what was encoded, one entry per user, bounded."""

from __future__ import annotations

import numpy as np

from app.metrics import Metrics
from app.user_vector_cache import UserVectorCache


def test_key_covers_version_features_and_history() -> None:
    key = UserVectorCache.key
    base = key("v1", {"country": "DE", "activity": 3}, ["i1", "i2"])
    assert base == key("v1", {"activity": 3, "country": "DE"}, ("i1", "i2"))  # canonical
    others = [
        key("v2", {"country": "DE", "activity": 3}, ["i1", "i2"]),
        key("v1", {"country": "FR", "activity": 3}, ["i1", "i2"]),
        key("v1", {"country": "DE", "activity": 3.0}, ["i1", "i2"]),
        key("v1", {"country": "DE", "activity": 3, "age_group": None}, ["i1", "i2"]),
        key("v1", {"country": "DE", "activity": 3}, ["i2", "i1"]),
        key("v1", {"country": "DE", "activity": 3}, ["i1"]),
    ]
    assert base not in others and len(set(others)) == len(others)


def test_one_entry_per_user_least_recently_used_evicted() -> None:
    cache = UserVectorCache(2, Metrics())
    k1, k2 = UserVectorCache.key("v", {}, ["a"]), UserVectorCache.key("v", {}, ["b"])
    assert k1 is not None and k2 is not None
    cache.put("u1", k1, np.ones(3, dtype=np.float32))
    cache.put("u2", k1, np.zeros(3, dtype=np.float32))
    assert cache.get("u1", k2) is None  # other inputs: never the stored vector
    assert cache.get("u1", k1) is not None  # u1 is now the most recent
    cache.put("u3", k1, np.zeros(3, dtype=np.float32))
    assert len(cache) == 2 and cache.get("u2", k1) is None
    cache.put("u1", k2, np.full(3, 2, dtype=np.float32))  # replaces u1's entry
    assert len(cache) == 2 and cache.get("u1", k1) is None
    np.testing.assert_array_equal(cache.get("u1", k2), [2, 2, 2])


def test_size_zero_caches_nothing() -> None:
    cache = UserVectorCache(0, Metrics())
    key = UserVectorCache.key("v", {}, [])
    assert key is not None
    cache.put("u", key, np.ones(2, dtype=np.float32))
    assert len(cache) == 0 and cache.get("u", key) is None

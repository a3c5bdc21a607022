"""The online user store: features and recent history per user, in Redis (standalone or
Cluster) or in process, with a TTL feature cache in front (`build_store`).

Imports the service's foundation (`app.config`, `app.errors`, `app.metrics`) and
`models.redis_keys` only."""

from app.config import StoreConfig
from app.metrics import Metrics
from app.store.base import EMPTY, FeatureStore, StoreStatus, UserRecord
from app.store.feature_cache import CachedFeatureStore
from app.store.memory import MemoryFeatureStore
from app.store.redis_store import RedisFeatureStore


def build_store(config: StoreConfig, metrics: Metrics) -> FeatureStore:
    """The store `config` describes: Redis behind the feature cache (when it has a size and a
    TTL), or the embedded store when no Redis is configured."""
    if config.redis is None:
        return MemoryFeatureStore(config.history_cap, config.ttl_s)
    store: FeatureStore = RedisFeatureStore(
        config.redis, history_cap=config.history_cap, ttl_s=config.ttl_s, metrics=metrics
    )
    if config.cache_size and config.cache_ttl_s:
        store = CachedFeatureStore(store, config.cache_size, config.cache_ttl_s, metrics)
    return store


__all__ = [
    "EMPTY",
    "CachedFeatureStore",
    "FeatureStore",
    "MemoryFeatureStore",
    "RedisFeatureStore",
    "StoreStatus",
    "UserRecord",
    "build_store",
]

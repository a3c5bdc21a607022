"""The online user store: features and recent history per user, in Redis (standalone or
Cluster) or in process, with a TTL feature cache in front (`build_store`); and the item change
log (`item_changes`: items added, changed or deleted at serving time; `build_item_change_log`).

Imports the service's foundation (`app.config`, `app.errors`, `app.metrics`) and
`models.redis_keys` only."""

from app.config import RedisConfig, StoreConfig
from app.metrics import Metrics
from app.store.base import EMPTY, FeatureStore, StoreStatus, UserRecord
from app.store.feature_cache import CachedFeatureStore
from app.store.item_changes import (
    ChangePage,
    ItemChange,
    ItemChangeLog,
    MemoryItemChangeLog,
    new_change,
)
from app.store.item_changes_redis import RedisItemChangeLog
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


def build_item_change_log(redis: RedisConfig | None) -> ItemChangeLog:
    """The change log every worker shares through Redis, else this process's own."""
    return MemoryItemChangeLog() if redis is None else RedisItemChangeLog(redis)


__all__ = [
    "EMPTY",
    "CachedFeatureStore",
    "ChangePage",
    "FeatureStore",
    "ItemChange",
    "ItemChangeLog",
    "MemoryFeatureStore",
    "MemoryItemChangeLog",
    "RedisFeatureStore",
    "RedisItemChangeLog",
    "StoreStatus",
    "UserRecord",
    "build_item_change_log",
    "build_store",
    "new_change",
]

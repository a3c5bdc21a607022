"""`Settings` -> the small config object each part of the service is built from.

Every value derived from a setting is computed here, once, by keyword: what one environment
variable turns into (REDIS_TIMEOUT_MS: the bound of every Redis call, of each of its socket
operations, of the wait for a pooled connection, the lateness that tells a busy worker from a
slow Redis, and the version pin's bound) reads in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.settings import BlasMode, IndexType, PruneMode, ScreenMode, Settings

# Share of the call timeout a call may wait for a free pooled connection: less than all of it,
# so that a full pool (this worker's own burst) tells itself apart from a slow Redis.
POOL_WAIT_SHARE = 0.5
# A call timeout noticed this many times its bound late means the event loop was blocked.
STALL_FACTOR = 2.0
# The version pin's calls are control plane, off the request path: they may wait longer than
# a feature fetch, at least this long.
CONTROL_TIMEOUT_MIN_S = 1.0


def _default(setting: str) -> Any:
    """A setting's default, declared once in `Settings`: configs built by hand (tests,
    benchmarks) start from the same values as the service."""
    return Settings.model_fields[setting].default


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """How the item index is built and searched (`app.search.build_item_index`)."""

    kind: IndexType = _default("index_type")
    hnsw_m: int = _default("hnsw_m")
    hnsw_ef_search: int = _default("hnsw_ef_search")
    hnsw_ef_construction: int = _default("hnsw_ef_construction")
    ivf_nlist: int = _default("ivf_nlist")
    ivf_nprobe: int = _default("ivf_nprobe")
    build_threads: int = _default("index_build_threads")  # for an ANN build; 0 = every core
    exact_screen: ScreenMode = _default("exact_screen")  # flat only: see `app.search.flat`
    exact_blas: BlasMode = _default("exact_blas")  # flat only: see `app.search.flat`
    exact_prune: PruneMode = _default("exact_prune")  # flat only: `app.search.cluster_pruning`
    filter_index_after: int = _default("filter_index_after")  # HNSW/IVF: `app.search.filter_index`
    filter_index_rows: float = _default("filter_index_rows")  # their rows, a share of the catalogue
    cache_root: Path | None = _default("index_cache_dir")  # `app.search.ann_cache.cache_dir`

    @classmethod
    def from_settings(cls, s: Settings) -> IndexConfig:
        return cls(
            kind=s.index_type,
            hnsw_m=s.hnsw_m,
            hnsw_ef_search=s.hnsw_ef_search,
            hnsw_ef_construction=s.hnsw_ef_construction,
            ivf_nlist=s.ivf_nlist,
            ivf_nprobe=s.ivf_nprobe,
            build_threads=s.index_build_threads,
            exact_screen=s.exact_screen,
            exact_blas=s.exact_blas,
            exact_prune=s.exact_prune,
            filter_index_after=s.filter_index_after,
            filter_index_rows=s.filter_index_rows,
            cache_root=s.index_cache_dir,
        )


@dataclass(frozen=True, kw_only=True)
class RedisConfig:
    """A Redis (or Redis Cluster) and the time each kind of call may take, in seconds."""

    url: str
    cluster: bool
    prefix: str
    timeout_s: float  # a request-path call as a whole, and each of its socket operations
    pool_wait_s: float  # the wait for a free pooled connection, within timeout_s
    stall_s: float  # a timeout noticed this late: the worker was busy, not Redis
    retry_after_s: float  # after a failure, calls fail fast this long
    max_connections: int  # per worker (per node of a cluster)
    control_timeout_s: float  # a call of the version pin (`app.model.version_pin`)
    control_pool_wait_s: float  # its wait for a free pooled connection

    @classmethod
    def from_settings(cls, s: Settings) -> RedisConfig | None:
        """None without REDIS_URL: the embedded store, and a pin of this process alone."""
        if not s.redis_url:
            return None
        timeout_s = s.redis_timeout_ms / 1000
        control_timeout_s = max(CONTROL_TIMEOUT_MIN_S, timeout_s)
        return cls(
            url=s.redis_url,
            cluster=s.redis_cluster,
            prefix=s.redis_prefix,
            timeout_s=timeout_s,
            pool_wait_s=timeout_s * POOL_WAIT_SHARE,
            stall_s=timeout_s * STALL_FACTOR,
            retry_after_s=s.redis_retry_after_ms / 1000,
            max_connections=s.redis_max_connections,
            control_timeout_s=control_timeout_s,
            control_pool_wait_s=control_timeout_s * POOL_WAIT_SHARE,
        )


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """The online user store (`app.store.build_store`)."""

    redis: RedisConfig | None  # None: the embedded, in-process store
    history_cap: int  # stored history length
    ttl_s: int  # TTL of written keys; 0 = none
    cache_size: int  # entries of the feature cache in front of Redis; 0 = no cache
    cache_ttl_s: float  # how long a cached user's features serve; 0 = no cache

    @classmethod
    def from_settings(cls, s: Settings) -> StoreConfig:
        return cls(
            redis=RedisConfig.from_settings(s),
            history_cap=s.history_cap,
            ttl_s=s.feature_ttl_s,
            cache_size=s.cache_size,
            cache_ttl_s=s.cache_ttl_s,
        )


# Items a recall returns when it names no `k`.
DEFAULT_K = 50


@dataclass(frozen=True, kw_only=True)
class RecallLimits:
    """Run-time request bounds (the schemas hold the static ones)."""

    max_k: int
    max_history: int  # ids in a request history, and item ids in one events call
    max_batch: int  # requests in one /v1/recall/batch call
    micro_batch: int  # concurrent /v1/recall requests served together

    def k(self, requested: int | None) -> int:
        """The items a recall returns: as asked, else DEFAULT_K, which MAX_K also bounds (a
        service configured below it still serves the recalls that name no k)."""
        return min(DEFAULT_K, self.max_k) if requested is None else requested

    @classmethod
    def from_settings(cls, s: Settings) -> RecallLimits:
        return cls(
            max_k=s.max_k,
            max_history=s.max_history,
            max_batch=s.max_batch,
            micro_batch=s.recall_batch_size,
        )

"""The per-app service objects, built in the lifespan (never at import time)."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import torch

from app.bundle_loader import IndexConfig
from app.cache import CachedFeatureStore, VectorCache
from app.feature_store import FeatureStore, MemoryFeatureStore, RedisFeatureStore
from app.metrics import Metrics
from app.model_sync import LocalPin, ModelSync, RedisPin, VersionPin
from app.recall import Limits, RecallService
from app.repository import ModelRepository
from app.settings import Settings
from app.users import UserService


@dataclass(frozen=True)
class Services:
    settings: Settings
    metrics: Metrics
    repository: ModelRepository
    sync: ModelSync
    store: FeatureStore
    recall: RecallService
    users: UserService
    worker: str  # host:pid of this worker process, named in /health/ready
    cpu: ThreadPoolExecutor | None  # the one thread that encodes and searches

    def close(self) -> None:
        if self.cpu is not None:
            self.cpu.shutdown(wait=False, cancel_futures=True)


def configure_threads(threads: int) -> None:
    """Intra-op threads for torch and FAISS (per process: one per uvicorn worker by default).

    Requests are tiny (one user, one query), so extra threads cannot speed one up; what they
    do on a small box is oversubscribe it: W workers x N OpenMP threads spinning on C cores."""
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def build_store(settings: Settings, metrics: Metrics) -> FeatureStore:
    if not settings.redis_url:
        return MemoryFeatureStore(settings.history_cap, settings.feature_ttl_s)
    timeout_s = settings.redis_timeout_ms / 1000
    store: FeatureStore = RedisFeatureStore(
        settings.redis_url,
        cluster=settings.redis_cluster,
        prefix=settings.redis_prefix,
        history_cap=settings.history_cap,
        ttl_s=settings.feature_ttl_s,
        timeout_s=timeout_s,
        retry_after_s=settings.redis_retry_after_ms / 1000,
        max_connections=settings.redis_max_connections,
        metrics=metrics,
    )
    if settings.cache_size and settings.cache_ttl_s:
        store = CachedFeatureStore(store, settings.cache_size, settings.cache_ttl_s, metrics)
    return store


def build_pin(settings: Settings) -> VersionPin:
    if not settings.redis_url:
        return LocalPin()
    # Control-plane calls, off the request path: they may wait longer than a feature fetch.
    timeout_s = max(1.0, settings.redis_timeout_ms / 1000)
    return RedisPin(settings.redis_url, settings.redis_prefix, timeout_s, settings.redis_cluster)


def build_services(settings: Settings, metrics: Metrics) -> Services:
    repository = ModelRepository(settings.model_dir, IndexConfig.from_settings(settings), metrics)
    store = build_store(settings, metrics)
    limits = Limits(
        settings.max_k, settings.max_history, settings.max_batch, settings.recall_batch_size
    )
    # FAISS's OpenMP reads its thread count per thread: set it in the thread that searches.
    cpu = None
    if settings.recall_thread:
        cpu = ThreadPoolExecutor(
            1, "recall-cpu", initializer=configure_threads, initargs=(settings.torch_threads,)
        )
    return Services(
        settings=settings,
        metrics=metrics,
        repository=repository,
        sync=ModelSync(repository, build_pin(settings), settings.reload_poll_s),
        store=store,
        recall=RecallService(
            repository,
            store,
            limits,
            metrics,
            cpu,
            VectorCache(settings.vector_cache_size, metrics),
        ),
        users=UserService(store, repository, settings.max_history),
        worker=f"{socket.gethostname()}:{os.getpid()}",
        cpu=cpu,
    )

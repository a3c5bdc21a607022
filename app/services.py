"""The composition root of a worker's service objects, built in the lifespan (never at import
time) from the settings, through the config objects of `app.config`."""

from __future__ import annotations

import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import torch

from app.catalogue import ItemCatalogue
from app.config import IndexConfig, RecallLimits, StoreConfig
from app.filters import FilterWarmup
from app.metrics import Metrics
from app.model import HistoryCapCheck, ModelRepository, ModelSync, build_pin
from app.recall import RecallService
from app.settings import Settings
from app.store import FeatureStore, build_item_change_log, build_store
from app.user_vector_cache import UserVectorCache
from app.users import UserService

log = logging.getLogger(__name__)

# A token guessed this easily is warned about at start: the compose stack's default, which its
# README tells users to replace, or a short one.
STACK_DEFAULT_TOKEN = "change-me"
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Services:
    settings: Settings
    metrics: Metrics
    repository: ModelRepository
    sync: ModelSync
    store: FeatureStore
    recall: RecallService
    users: UserService
    catalogue: ItemCatalogue  # items added and deleted at serving time
    worker: str  # host:pid of this worker process, named in /health/ready
    cpu: ThreadPoolExecutor | None  # the one thread that encodes and searches

    def start(self) -> None:
        """Replay the item changes and load the fleet's model version in the background (the
        load applies the changes before it serves), then keep following both."""
        self.catalogue.start()
        self.sync.start()

    async def aclose(self) -> None:
        await self.sync.stop()
        await self.catalogue.stop()
        await self.store.aclose()
        if self.cpu is not None:
            self.cpu.shutdown(wait=False, cancel_futures=True)


def configure_threads(threads: int) -> None:
    """Intra-op threads for torch and FAISS (per process: one per uvicorn worker by default).

    Requests are tiny (one user, one query), so extra threads cannot speed one up; what they
    do on a small box is oversubscribe it: W workers x N OpenMP threads spinning on C cores."""
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def build_services(settings: Settings, metrics: Metrics) -> Services:
    """Every service object of one worker, not started (`Services.start`)."""
    _warn_about_a_weak_admin_token(settings.admin_token.get_secret_value())
    repository = ModelRepository(settings.model_dir, IndexConfig.from_settings(settings), metrics)
    store_config = StoreConfig.from_settings(settings)
    store = build_store(store_config, metrics)
    limits = RecallLimits.from_settings(settings)
    # FAISS's OpenMP reads its thread count per thread: set it in the thread that searches.
    cpu = None
    if settings.recall_thread:
        cpu = ThreadPoolExecutor(
            1, "recall-cpu", initializer=configure_threads, initargs=(settings.torch_threads,)
        )
    size = settings.vector_cache_size
    vectors = UserVectorCache(size, metrics) if size else None  # 0: every user encoded
    changes = build_item_change_log(store_config.redis)
    catalogue = ItemCatalogue(repository, changes, metrics, settings.reload_poll_s)
    repository.attach(catalogue)
    recall = RecallService(repository, store, limits, metrics, cpu, vectors)
    repository.attach(FilterWarmup(lambda: repository.current, recall.filters))
    repository.attach(HistoryCapCheck(store))
    return Services(
        settings=settings,
        metrics=metrics,
        repository=repository,
        sync=ModelSync(repository, build_pin(store_config.redis), settings.reload_poll_s),
        store=store,
        recall=recall,
        users=UserService(store, repository, limits.max_history),
        catalogue=catalogue,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        cpu=cpu,
    )


def _warn_about_a_weak_admin_token(token: str) -> None:
    """A token anyone may guess lets them delete and add items for the whole fleet and pin
    any version: said at start-up, not refused (the stack starts with its default)."""
    if token and (token == STACK_DEFAULT_TOKEN or len(token) < MIN_TOKEN_LENGTH):
        log.warning(
            "ADMIN_TOKEN is %s: whoever reaches this service can change its items and pin its "
            "model version; set a long random one",
            "the stack's default" if token == STACK_DEFAULT_TOKEN else "short",
        )

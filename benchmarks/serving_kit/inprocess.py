"""The in-process floor of one recall, and HNSW recall@K against exact search.

Both load the bundle the service serves, through the service's public entry points alone
(the settings, the model object `app.model.ServingModel`, the composition root
`app.services.build_services`, the store builder `app.store.build_store`), in this process,
with one OpenMP/torch thread as a service worker has. The floor is what one request costs
with no HTTP, no event-loop contention and no other request in flight:

    parse body -> Redis fetch (one round trip, no L1 cache) -> prepare -> encode -> search
    -> JSON bytes (the service's own serialiser)

Stage times are the service's own (`Metrics.observe_stage`). A tree measured with `--tree`
needs this layout of `app/` (issue 21); to compare with an older tree, run that tree's own
`benchmarks/serving.py`.

Import this module only after OMP_NUM_THREADS is set (torch and FAISS read it at import).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from app.config import IndexConfig, StoreConfig
from app.http.schemas import RecallRequest
from app.metrics import Metrics
from app.model import ServingModel
from app.services import Services, build_services, configure_threads
from app.settings import Settings
from app.store import build_store
from harness.latency import percentile_ms
from models.bundle import read_latest

# The service's stage names, as the report names them.
STAGES = {
    "feature_fetch": "fetch",
    "encode": "encode",
    "search": "search",
    "serialise": "serialise",
}


def service_settings(model_dir: Path, index_type: str, redis_url: str) -> Settings:
    """The settings a service started with these env vars would read (others from the env)."""
    return Settings(model_dir=model_dir, index_type=index_type, redis_url=redis_url)  # type: ignore[arg-type]


def _ann_files(settings: Settings, bundle_dir: Path) -> set[str]:
    """The built indexes in the bundle's index cache (the on-disk layout the README states)."""
    root = settings.index_cache_dir
    directory = root / bundle_dir.name if root is not None else bundle_dir / "index-cache"
    return {p.name for p in directory.glob("*.faiss")} if directory.is_dir() else set()


def load(settings: Settings) -> tuple[ServingModel, float, bool]:
    """Load + index + warm up LATEST with every core, as the service's model object does.

    The ANN index lands in the service's index cache, so the service started next reads the
    index built here. Returns the model, the seconds taken, and whether an HNSW or IVF index
    came from that cache (no new file in it).
    """
    configure_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    path = settings.model_dir / read_latest(settings.model_dir)
    before = _ann_files(settings, path)
    model = ServingModel.load(path, IndexConfig.from_settings(settings))
    cached = settings.index_type != "flat" and _ann_files(settings, path) == before
    seconds = time.perf_counter() - start
    configure_threads(settings.torch_threads)
    return model, seconds, cached


def _pcts(samples: Sequence[float]) -> dict[str, float | None]:
    at = {f"p{round(q * 100)}_ms": percentile_ms(samples, q, digits=4) for q in (0.5, 0.9, 0.99)}
    return at | {"n": len(samples)}


class StageRecorder(Metrics):
    """The service's metrics, keeping each stage observation while `recording`."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = False
        self.samples: dict[str, float] = {}

    def observe_stage(self, stage: str, seconds: float) -> None:
        super().observe_stage(stage, seconds)
        if self.recording:
            self.samples[stage] = seconds


def _services(model: ServingModel, settings: Settings, metrics: Metrics) -> Services:
    """The worker's services serving `model`, without the L1 feature cache (every recall pays
    the Redis round trip, as a cache miss does) or the user-vector cache."""
    floor = settings.model_copy(update={"cache_size": 0, "vector_cache_size": 0})
    services = build_services(floor, metrics)
    services.repository.swap(model)
    return services


CONCURRENCY = 16  # the load runs' connection count


async def _concurrent(
    services: Services, bodies: Sequence[bytes], concurrency: int
) -> dict[str, Any]:
    """CPU and wall time per recall when `concurrency` recalls are in flight at once (as on a
    loaded worker): what a service that serves concurrent requests together saves."""

    async def one(body: bytes) -> bytes:
        return await services.recall.recall(RecallRequest.model_validate_json(body))

    rounds = max(1, len(bodies) // concurrency)
    cpu_start, start = time.process_time(), time.perf_counter()
    for r in range(rounds):
        await asyncio.gather(*map(one, bodies[r * concurrency : (r + 1) * concurrency]))
    n = min(len(bodies), rounds * concurrency)
    return {
        "concurrency": concurrency,
        "cpu_ms_per_recall": round((time.process_time() - cpu_start) / n * 1000, 4),
        "wall_ms_per_recall": round((time.perf_counter() - start) / n * 1000, 4),
    }


async def _stages(
    services: Services, metrics: StageRecorder, ids: Sequence[str], k: int
) -> dict[str, list[float]]:
    """Each stage's time in lone recalls of `ids`; a recall whose features did not come from
    Redis (a timeout on a busy machine) is no sample."""
    stages: dict[str, list[float]] = {name: [] for name in STAGES.values()}
    for uid in ids:
        metrics.samples, metrics.recording = {}, True
        payload = await services.recall.recall(RecallRequest(user_id=uid, k=k))
        metrics.recording = False
        if json.loads(payload)["feature_source"] == "redis":
            for stage, seconds in metrics.samples.items():
                stages[STAGES[stage]].append(seconds)
    return stages


async def _floor(
    model: ServingModel, settings: Settings, users: int, k: int, iterations: int, seed: int
) -> dict[str, Any]:
    metrics = StageRecorder()
    services = _services(model, settings, metrics)
    rng = random.Random(seed)
    ids = [f"u{rng.randrange(users)}" for _ in range(iterations)]
    bodies = [f'{{"user_id":"{uid}","k":{k}}}'.encode() for uid in ids]
    total: list[float] = []
    try:
        for body in bodies[: min(200, iterations)]:  # warm-up: TorchScript, caches, sockets
            await services.recall.recall(RecallRequest.model_validate_json(body))
        payloads: list[bytes] = []
        cpu_start = time.process_time()
        for body in bodies:
            start = time.perf_counter()
            payload = await services.recall.recall(RecallRequest.model_validate_json(body))
            total.append(time.perf_counter() - start)
            payloads.append(payload)
        cpu_ms = (time.process_time() - cpu_start) / len(bodies) * 1000
        sources = Counter(json.loads(payload)["feature_source"] for payload in payloads)
        concurrent = await _concurrent(services, bodies, CONCURRENCY)
        stages = await _stages(services, metrics, ids, k)
    finally:
        await services.aclose()
    return {
        "what": "parse + Redis fetch (no L1 cache) + prepare + encode + search + JSON, 1 thread; "
        "`concurrent`: the same with 16 recalls in flight at once",
        "recall": _pcts(total),
        # CPU time of this process (the Redis client included, redis-server not): other jobs
        # on the machine disturb it far less than the wall-clock percentiles.
        "recall_cpu_ms_mean": round(cpu_ms, 4),
        "concurrent": concurrent,
        "stages": {name: _pcts(v) for name, v in stages.items() if v},
        "response_bytes_mean": round(statistics.fmean(len(p) for p in payloads)),
        # Anything but "redis" means a degraded recall (e.g. a Redis timeout): not the floor.
        "feature_sources": dict(sources),
    }


def measure_floor(
    model: ServingModel, settings: Settings, users: int, k: int, iterations: int, seed: int
) -> dict[str, Any]:
    """p50/p90/p99 of one in-process recall and of its stages, over random published users."""
    configure_threads(settings.torch_threads)
    return asyncio.run(_floor(model, settings, users, k, iterations, seed))


async def _user_vectors(model: ServingModel, settings: Settings, ids: list[str]) -> np.ndarray:
    # An offline read: a generous timeout, and batches the size of the encode calls.
    offline = settings.model_copy(update={"cache_size": 0, "redis_timeout_ms": 10_000})
    store = build_store(StoreConfig.from_settings(offline), Metrics())
    vectors = []
    try:
        for start in range(0, len(ids), 256):
            chunk = ids[start : start + 256]
            records = await store.fetch_many(chunk)
            rows = [records[uid].features for uid in chunk]
            histories = [records[uid].history for uid in chunk]
            vectors.append(model.encode(rows, histories))
    finally:
        await store.aclose()
    return np.concatenate(vectors)


def hnsw_recall(
    model: ServingModel,
    settings: Settings,
    users: int,
    k: int,
    sample: int,
    ef_values: Sequence[int],
    seed: int,
) -> dict[str, Any]:
    """recall@k of the model's HNSW index against exact inner-product search, for the user
    vectors of `sample` random published users (features and histories read from Redis and
    encoded by the model's tower), at the configured efSearch and at each of `ef_values`."""
    rng = random.Random(seed)
    ids = [f"u{u}" for u in rng.sample(range(users), min(sample, users))]
    vectors = asyncio.run(_user_vectors(model, settings, ids))
    configure_threads(os.cpu_count() or 1)
    exact = faiss.IndexFlatIP(model.dim)
    exact.add(model.index.matrix.numpy())
    _, truth = exact.search(vectors, k)
    del exact
    hnsw: Any = faiss.downcast_index(model.index.faiss).hnsw  # type: ignore[attr-defined]
    default_ef = int(hnsw.efSearch)
    configure_threads(settings.torch_threads)
    sweep: dict[str, dict[str, float]] = {}
    try:
        for ef in sorted({default_ef, *ef_values}):
            hnsw.efSearch = ef
            start = time.perf_counter()
            _, found = model.index.search(vectors, k)
            per_query_ms = (time.perf_counter() - start) / len(ids) * 1000
            hits = [
                len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)
            ]
            sweep[str(ef)] = {
                "recall": round(sum(hits) / (k * len(ids)), 4),
                "min_user_recall": round(min(hits) / k, 3),
                "search_ms_per_query": round(per_query_ms, 4),
            }
    finally:
        hnsw.efSearch = default_ef
    return {
        "k": k,
        "users": len(ids),
        "hnsw_m": settings.hnsw_m,
        "ef_construction": settings.hnsw_ef_construction,
        "default_ef_search": default_ef,
        "recall_at_default": sweep[str(default_ef)]["recall"],
        "by_ef_search": sweep,
    }

"""The in-process floor of one recall, and HNSW recall@K against exact search.

Both load the bundle the service serves, with the service's own code (`app.bundle_loader`,
`app.services.build_store`, `app.recall.RecallService`, `app.retrieval`) and settings, in
this process, with one OpenMP/torch thread as a service worker has. The floor is what one
request costs with no HTTP, no event-loop contention and no other request in flight:

    parse body -> Redis fetch (one round trip, no L1 cache) -> prepare -> encode -> search
    -> JSON bytes (the service's own serialiser when it returns bytes, else the response
    model dumped by pydantic's dump_json, as FastAPI 0.165's fast path)

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
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import orjson
from pydantic import TypeAdapter

from app.bundle_loader import IndexConfig, ServingBundle, build_index, load_bundle
from app.errors import FeatureStoreUnavailable
from app.feature_store import FeatureStore, UserRecord
from app.metrics import Metrics
from app.recall import Limits, RecallService
from app.repository import ModelRepository
from app.retrieval import Query, retrieve
from app.schemas import RecallRequest, RecallResponse
from app.services import build_store, configure_threads
from app.settings import Settings
from models.bundle import ITEM_EMBEDDINGS, read_latest


class LoadedRepository(ModelRepository):
    """A repository serving one bundle loaded by the caller (so the benchmark can build the
    index with every core, then measure with one thread)."""

    def __init__(self, bundle: ServingBundle, metrics: Metrics) -> None:
        super().__init__(bundle.path.parent, IndexConfig(bundle.index_type), metrics)
        self._bundle = bundle

    def require(self) -> ServingBundle:
        return self._bundle


def service_settings(model_dir: Path, index_type: str, redis_url: str) -> Settings:
    """The settings a service started with these env vars would read (others from the env)."""
    return Settings(model_dir=model_dir, index_type=index_type, redis_url=redis_url)  # type: ignore[arg-type]


def _index_cache_path(bundle: ServingBundle, config: IndexConfig) -> Path:
    name = f"{bundle.version}-{config.kind}-m{config.hnsw_m}-efc{config.hnsw_ef_construction}"
    return bundle.path.parent / "index-cache" / f"{name}.faiss"


def load(settings: Settings) -> tuple[ServingBundle, float, bool]:
    """Load + index + warm up LATEST with every core, as `app.bundle_loader` does.

    A service that caches its ANN index beside the bundle (`IndexConfig.cache_name`) loads
    here exactly as it will in the service, so the index built here is the one the service
    then reads from that cache. For an older tree under `--tree`, an HNSW index is built by
    its own `build_index` and kept in the benchmark's `<model dir>/index-cache/` for later
    runs, and that service builds its own. Returns the bundle, the seconds taken, and whether
    the index came from a cache.
    """
    configure_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    path = settings.model_dir / read_latest(settings.model_dir)
    config = IndexConfig.from_settings(settings)
    if config.kind != "hnsw":
        bundle = load_bundle(path, config)
        cached = False
    elif hasattr(config, "cache_name"):  # the service's own index cache
        checksum = json.loads((path / "manifest.json").read_text())["sha256"][ITEM_EMBEDDINGS]
        cached = (path / "index-cache" / f"{config.cache_name(checksum)}.faiss").is_file()
        bundle = load_bundle(path, config)
    else:
        flat = load_bundle(path, replace(config, kind="flat"))
        cache = _index_cache_path(flat, config)
        cached = cache.is_file()
        if cached:
            index: Any = faiss.read_index(str(cache))
        else:
            index = build_index(flat.embeddings, config)
            cache.parent.mkdir(exist_ok=True)
            faiss.write_index(index, str(cache) + ".tmp")
            os.replace(str(cache) + ".tmp", cache)
        faiss.downcast_index(index).hnsw.efSearch = config.hnsw_ef_search  # type: ignore[attr-defined]
        bundle = replace(flat, index=index, index_type="hnsw")
    seconds = time.perf_counter() - start
    configure_threads(settings.torch_threads)
    return bundle, seconds, cached


def _json(adapter: TypeAdapter[RecallResponse], response: Any) -> bytes:
    """The response body: as the service serialised it (a service that returns bytes), else
    a response model dumped by pydantic as FastAPI does."""
    if isinstance(response, bytes):
        return response
    return adapter.dump_json(adapter.validate_python(response))


def _pcts(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 4)

    return {"p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "n": len(ordered)}


def _query(bundle: ServingBundle, record: UserRecord, k: int) -> Query:
    """What the service prepares for a stored user with no request features (exclude seen)."""
    return Query.prepare(bundle, record.features, record.history, k)


CONCURRENCY = 16  # the load runs' connection count


async def _concurrent(
    service: RecallService,
    adapter: TypeAdapter[RecallResponse],
    bodies: Sequence[bytes],
    concurrency: int,
) -> dict[str, Any]:
    """CPU and wall time per recall when `concurrency` recalls are in flight at once (as on a
    loaded worker): what a service that serves concurrent requests together saves."""

    async def one(body: bytes) -> bytes:
        return _json(adapter, await service.recall(RecallRequest.model_validate_json(body)))

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


async def _floor(
    bundle: ServingBundle, settings: Settings, users: int, k: int, iterations: int, seed: int
) -> dict[str, Any]:
    metrics = Metrics()
    # No L1 cache: every iteration pays the Redis round trip, as a cache miss does.
    store: FeatureStore = build_store(settings.model_copy(update={"cache_size": 0}), metrics)
    limits = Limits(settings.max_k, settings.max_history, settings.max_batch)
    service = RecallService(LoadedRepository(bundle, metrics), store, limits, metrics)
    adapter = TypeAdapter(RecallResponse)
    rng = random.Random(seed)
    ids = [f"u{rng.randrange(users)}" for _ in range(iterations)]
    bodies = [f'{{"user_id":"{uid}","k":{k}}}'.encode() for uid in ids]
    total: list[float] = []
    sizes: list[int] = []
    sources: Counter[str] = Counter()
    try:
        for body in bodies[: min(200, iterations)]:  # warm-up: TorchScript, caches, sockets
            await service.recall(RecallRequest.model_validate_json(body))
        payloads: list[bytes] = []
        cpu_start = time.process_time()
        for body in bodies:
            start = time.perf_counter()
            payload = _json(adapter, await service.recall(RecallRequest.model_validate_json(body)))
            total.append(time.perf_counter() - start)
            payloads.append(payload)
        cpu_ms = (time.process_time() - cpu_start) / len(bodies) * 1000
        for payload in payloads:
            sizes.append(len(payload))
            sources[json.loads(payload)["feature_source"]] += 1
        concurrent = await _concurrent(service, adapter, bodies, CONCURRENCY)
        stages: dict[str, list[float]] = {"fetch": [], "encode": [], "search": []}
        for uid in ids:
            start = time.perf_counter()
            try:
                record = (await store.fetch_many([uid]))[uid]
            except FeatureStoreUnavailable:  # timed out on a busy machine: not a sample
                continue
            stages["fetch"].append(time.perf_counter() - start)
            retrieve(bundle, [_query(bundle, record, k)], lambda s, t: stages[s].append(t))
        serialise: list[float] = []
        for uid in ids[: min(500, iterations)]:
            response = await service.recall(RecallRequest(user_id=uid, k=k))
            if isinstance(response, bytes):  # serialised by the service: time its serialiser
                data = json.loads(response)
                start = time.perf_counter()
                orjson.dumps(data)
            else:
                start = time.perf_counter()
                adapter.dump_json(adapter.validate_python(response))
            serialise.append(time.perf_counter() - start)
    finally:
        await store.aclose()
    return {
        "what": "parse + Redis fetch (no L1 cache) + prepare + encode + search + JSON, 1 thread; "
        "`concurrent`: the same with 16 recalls in flight at once",
        "recall": _pcts(total),
        # CPU time of this process (the Redis client included, redis-server not): other jobs
        # on the machine disturb it far less than the wall-clock percentiles.
        "recall_cpu_ms_mean": round(cpu_ms, 4),
        "concurrent": concurrent,
        "stages": {name: _pcts(v) for name, v in stages.items()} | {"serialise": _pcts(serialise)},
        "response_bytes_mean": round(statistics.fmean(sizes)),
        # Anything but "redis" means a degraded recall (e.g. a Redis timeout): not the floor.
        "feature_sources": dict(sources),
    }


def measure_floor(
    bundle: ServingBundle, settings: Settings, users: int, k: int, iterations: int, seed: int
) -> dict[str, Any]:
    """p50/p90/p99 of one in-process recall and of its stages, over random published users."""
    configure_threads(settings.torch_threads)
    return asyncio.run(_floor(bundle, settings, users, k, iterations, seed))


async def _user_vectors(bundle: ServingBundle, settings: Settings, ids: list[str]) -> np.ndarray:
    # An offline read: a generous timeout, and batches the size of the encode calls.
    offline = settings.model_copy(update={"cache_size": 0, "redis_timeout_ms": 10_000})
    store = build_store(offline, Metrics())
    vectors = []
    try:
        for start in range(0, len(ids), 256):
            chunk = ids[start : start + 256]
            records = await store.fetch_many(chunk)
            rows = [records[uid].features for uid in chunk]
            histories = [records[uid].history for uid in chunk]
            vectors.append(bundle.encode(rows, histories))
    finally:
        await store.aclose()
    return np.concatenate(vectors)


def hnsw_recall(
    bundle: ServingBundle,
    settings: Settings,
    users: int,
    k: int,
    sample: int,
    ef_values: Sequence[int],
    seed: int,
) -> dict[str, Any]:
    """recall@k of the bundle's HNSW index against exact inner-product search, for the user
    vectors of `sample` random published users (features and histories read from Redis and
    encoded by the bundle's tower), at the configured efSearch and at each of `ef_values`."""
    rng = random.Random(seed)
    ids = [f"u{u}" for u in rng.sample(range(users), min(sample, users))]
    vectors = asyncio.run(_user_vectors(bundle, settings, ids))
    configure_threads(os.cpu_count() or 1)
    exact = faiss.IndexFlatIP(bundle.dim)
    exact.add(bundle.embeddings)
    _, truth = exact.search(vectors, k)
    del exact
    hnsw: Any = faiss.downcast_index(bundle.index).hnsw  # type: ignore[attr-defined]
    default_ef = int(hnsw.efSearch)
    configure_threads(settings.torch_threads)
    sweep: dict[str, dict[str, float]] = {}
    try:
        for ef in sorted({default_ef, *ef_values}):
            hnsw.efSearch = ef
            start = time.perf_counter()
            _, found = bundle.index.search(vectors, k)
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

"""The ANN index cached beside the bundle: reused when valid, rebuilt when corrupt or not ours,
never required (an unwritable bundle directory still serves)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
from helpers_app import Reference, make_settings, serve

from app.config import IndexConfig
from app.model import ServingModel
from app.search import FaissIndex
from app.search.ann_cache import CACHE_DIR, AnnIndexCache
from models.bundle import read_latest

HNSW = IndexConfig(kind="hnsw", hnsw_m=8, hnsw_ef_search=200, hnsw_ef_construction=40)


def bundle_dir(model_dir: Path) -> Path:
    return model_dir / read_latest(model_dir)


def cache_files(path: Path) -> list[str]:
    cache = path / CACHE_DIR
    return (
        sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
        if cache.is_dir()
        else []
    )


def load(path: Path, caplog: pytest.LogCaptureFixture) -> tuple[ServingModel, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app"):
        model = ServingModel.load(path, HNSW)
    how = next(r.getMessage() for r in caplog.records if "hnsw index" in r.getMessage())
    return model, how


def top(model: ServingModel) -> np.ndarray:
    vectors = model.encode([{}, {"country": "DE"}], [[], ["i1", "i2"]])
    return model.index.search(vectors, 20)[1]


def test_built_index_is_cached_then_read(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = bundle_dir(model_dir)
    built, how = load(path, caplog)
    assert "built" in how
    files = cache_files(path)
    assert len(files) == 2 and files[0].startswith("hnsw-M8-efc40-")
    sidecar = json.loads((path / CACHE_DIR / files[1]).read_text())
    assert sidecar["key"]["hnsw_m"] == 8 and sidecar["key"]["n_items"] == built.n_items

    cached, how = load(path, caplog)
    assert "read from the cache" in how
    # efSearch is a search-time setting: applied to the cached index too.
    assert isinstance(cached.index, FaissIndex) and cached.index.faiss.hnsw.efSearch == 200
    np.testing.assert_array_equal(top(cached), top(built))

    other = IndexConfig(kind="hnsw", hnsw_m=8, hnsw_ef_search=200, hnsw_ef_construction=41)
    ServingModel.load(path, other)  # other build parameters: a cache file of their own
    assert len(cache_files(path)) == 4


@pytest.mark.parametrize("damage", ["index-bytes", "sidecar-checksum", "sidecar-key"])
def test_corrupt_or_foreign_cache_is_rebuilt(
    model_dir: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    path = bundle_dir(model_dir)
    built, _ = load(path, caplog)
    index_file, sidecar_file = (path / CACHE_DIR / f for f in cache_files(path))
    if damage == "index-bytes":
        data = bytearray(index_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        index_file.write_bytes(bytes(data))
    else:
        meta = json.loads(sidecar_file.read_text())
        if damage == "sidecar-checksum":
            meta["sha256"] = "0" * 64
        else:
            meta["key"]["n_items"] += 1
        sidecar_file.write_text(json.dumps(meta))

    rebuilt, how = load(path, caplog)
    assert "built" in how
    assert any("ignoring cached index" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(top(rebuilt), top(built))
    _, how = load(path, caplog)  # and the rebuilt one was cached again, valid
    assert "read from the cache" in how


def test_unwritable_bundle_dir_builds_without_cache(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = bundle_dir(model_dir)
    if os.geteuid() == 0:  # root writes through permissions: block the cache dir instead
        (path / CACHE_DIR).write_text("not a directory")
    else:
        path.chmod(0o555)
    try:
        for _ in range(2):
            model, how = load(path, caplog)
            assert "built" in how
            assert len(top(model)[0]) == 20
    finally:
        path.chmod(0o755)
    assert not (path / CACHE_DIR).is_dir()


@pytest.mark.anyio
async def test_service_serves_exact_results_from_a_cached_hnsw_index(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = bundle_dir(model_dir)
    reference = Reference(path)
    ServingModel.load(path, HNSW)  # leaves the cache the service then reads
    settings = make_settings(
        model_dir, index_type="hnsw", hnsw_m=8, hnsw_ef_search=200, hnsw_ef_construction=40
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app"):
        async with serve(settings) as client:
            body = {"user_id": "x", "k": 10, "history": ["i3"]}
            items = (await client.post("/v1/recall", json=body)).json()["items"]
    how = [m for r in caplog.records if (m := r.getMessage()).startswith("hnsw index")]
    assert len(how) == 1 and "read from the cache" in how[0], how
    # 200 items with efSearch 200: the graph search visits them all, so it is exact.
    assert [i["item_id"] for i in items] == [i for i, _ in reference.top_k({}, ["i3"], 10)]


@pytest.mark.anyio
async def test_index_cache_dir_caches_beside_a_read_only_bundle(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A read-only artifacts volume (the compose stack's) keeps its indexes in INDEX_CACHE_DIR.
    path = bundle_dir(model_dir)
    reference = Reference(path)
    root = tmp_path / "index-cache"
    hnsw = {"hnsw_m": 8, "hnsw_ef_search": 200, "hnsw_ef_construction": 40}
    settings = make_settings(model_dir, index_type="hnsw", index_cache_dir=root, **hnsw)
    path.chmod(0o555)
    try:
        async with serve(settings) as client:
            body = {"user_id": "x", "k": 10, "history": ["i3"]}
            items = (await client.post("/v1/recall", json=body)).json()["items"]
        with caplog.at_level(logging.INFO, logger="app"):
            ServingModel.load(path, dataclasses.replace(HNSW, cache_root=root))
    finally:
        path.chmod(0o755)
    assert [i["item_id"] for i in items] == [i for i, _ in reference.top_k({}, ["i3"], 10)]
    assert any("read from the cache" in r.getMessage() for r in caplog.records)
    cached = sorted(p.name for p in (root / path.name).iterdir() if not p.name.startswith("."))
    assert len(cached) == 2 and cached[0].startswith("hnsw-M8-efc40-")
    assert not (path / CACHE_DIR).exists()


def test_concurrent_loaders_build_once(tmp_path: Path) -> None:
    # Workers starting together: one builds, the others wait for it and read its cache.
    vectors = np.random.default_rng(0).standard_normal((500, 8), dtype=np.float32)
    key = {"embeddings_sha256": "x" * 64, "n_items": 500, "dim": 8, "kind": "hnsw"}
    builds: list[int] = []
    gate = threading.Event()

    def build() -> faiss.Index:
        builds.append(1)
        gate.wait(5)  # hold the lock while the others arrive
        index = faiss.IndexHNSWFlat(8, 4, faiss.METRIC_INNER_PRODUCT)
        index.add(vectors)
        return index

    results: list[bool] = []

    def load() -> None:
        results.append(AnnIndexCache(tmp_path, "hnsw-test", key).load_or_build(build)[1])

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    threading.Timer(0.5, gate.set).start()
    for t in threads:
        t.join(10)
    assert len(builds) == 1
    assert sorted(results) == [False, True, True]

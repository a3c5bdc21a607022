"""A hot filter's own index (`app.search.filter_index`): built in the background once a filter
has been searched often, then answering exactly from the filter's rows alone; narrowed by
deleted items without a rebuild; capped; never where it would not pay. (Over HTTP:
tests/test_filters.py.)"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers_vectors import clustered_items, queries_near

from app.config import IndexConfig
from app.search import AllowedRows, FaissIndex, build_faiss_index
from app.search.filter_index import FilterIndexes

N, DIM, K = 20_000, 16, 50


@pytest.fixture(scope="module")
def items() -> np.ndarray:
    # Tight enough for a 10 % filter's 51 clusters to bound every query's top 50 (a query
    # they cannot bound goes to the graph).
    return clustered_items(N, DIM, noise=0.1)


@pytest.fixture(scope="module")
def queries(items: np.ndarray) -> np.ndarray:
    return queries_near(items)


@pytest.fixture(scope="module")
def hnsw(items: np.ndarray) -> Any:
    return build_faiss_index(items, IndexConfig(kind="hnsw", hnsw_m=16, hnsw_ef_search=64))


@pytest.fixture(autouse=True)
def not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 20k-item catalogue keeps a 10 % filter's rows and scans them: not here.
    monkeypatch.setattr("app.search.allowed.MAX_GATHERED_ROWS", 0)


def _mask(share: float, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).random(N) < share


def _brute(items: np.ndarray, queries: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ items.T
    scores[:, ~mask] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _selector_calls(index: FaissIndex) -> list[int]:
    """Records each search of the HNSW graph (or IVF) with a selector (the path an own index
    spares)."""
    calls: list[int] = []
    graph: Any = index.faiss
    search = graph.search

    def counted(vectors: np.ndarray, k: int, params: Any = None) -> Any:
        if params is not None:
            calls.append(len(vectors))
        return search(vectors, k, params=params)

    graph.search = counted
    return calls


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_a_filter_searched_often_gets_its_own_exact_index(
    items: np.ndarray, queries: np.ndarray, hnsw: Any, kind: str
) -> None:
    graph = hnsw
    if kind == "ivf":
        graph = build_faiss_index(items, IndexConfig(kind="ivf", ivf_nlist=128, ivf_nprobe=8))
    index = FaissIndex(graph, items, kind, filter_index_after=3)  # type: ignore[arg-type]
    calls = _selector_calls(index)
    allowed = AllowedRows(_mask(0.1))
    for _ in range(3):
        assert not index.filter_indexes.ready(allowed)
        index.search(queries, K, allowed)
    assert len(calls) >= 3  # the graph served until then
    index.filter_indexes.wait(60)
    assert index.filter_indexes.ready(allowed)
    calls.clear()
    scores, rows = index.search(queries, K, allowed)
    assert not calls  # the filter's own index answered every query
    np.testing.assert_array_equal(rows, _brute(items, queries, allowed.mask, K))
    want = np.sort(queries @ items[allowed.mask].T, axis=1)[:, ::-1][:, :K]
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)


def test_deleted_items_narrow_a_filter_in_its_index_without_a_rebuild(
    items: np.ndarray, queries: np.ndarray, hnsw: Any
) -> None:
    index = FaissIndex(hnsw, items, "hnsw", filter_index_after=1)
    allowed = AllowedRows(_mask(0.1))
    index.search(queries, K, allowed)
    index.filter_indexes.wait(60)
    # The best rows of each query deleted: the overlay's narrowing of the filter.
    best = _brute(items, queries, allowed.mask, 5).ravel()
    narrowed = AllowedRows(allowed.mask & ~np.isin(np.arange(N), best), base=allowed)
    assert index.filter_indexes.ready(narrowed)
    calls = _selector_calls(index)
    _, rows = index.search(queries, K, narrowed)
    assert not calls
    assert not np.isin(rows, best).any()
    np.testing.assert_array_equal(rows, _brute(items, queries, narrowed.mask, K))


def test_no_own_index_when_switched_off_or_where_the_graph_is_cheap(
    items: np.ndarray, queries: np.ndarray, hnsw: Any
) -> None:
    off = FaissIndex(hnsw, items, "hnsw", filter_index_after=0)
    on = FaissIndex(hnsw, items, "hnsw", filter_index_after=1)
    selective, wide = AllowedRows(_mask(0.1)), AllowedRows(_mask(0.5))
    for _ in range(3):
        off.search(queries, K, selective)
        on.search(queries, K, wide)  # half the catalogue: the selector costs ~unfiltered
    off.filter_indexes.wait(60)
    on.filter_indexes.wait(60)
    assert not off.filter_indexes.ready(selective)
    assert not on.filter_indexes.ready(wide)


def test_own_indexes_hold_at_most_max_rows_the_least_recently_searched_going_first(
    items: np.ndarray, queries: np.ndarray
) -> None:
    first, second, third = (AllowedRows(_mask(0.1, seed=seed)) for seed in (3, 4, 5))
    indexes = FilterIndexes(items, after=1, max_rows=first.count + second.count + 100)
    indexes.pause = 0.0
    for allowed in (first, second):
        assert indexes.search(queries, K, allowed) is None  # counted, built in the background
        indexes.wait(60)
    assert indexes.ready(first) and indexes.ready(second) and len(indexes) == 2
    indexes.search(queries, K, first)  # now the most recently searched
    indexes.search(queries, K, third)
    indexes.wait(60)
    assert indexes.ready(third) and indexes.ready(first) and not indexes.ready(second)
    found = indexes.search(queries, K, third)
    assert found is not None
    _, rows, done = found
    assert done.all()
    np.testing.assert_array_equal(rows, _brute(items, queries, third.mask, K))


def test_a_filter_compiled_again_finds_its_index(items: np.ndarray, queries: np.ndarray) -> None:
    indexes = FilterIndexes(items, after=1, max_rows=N)
    mask = _mask(0.1)
    indexes.search(queries, K, AllowedRows(mask))
    indexes.wait(60)
    # The worker's filter cache let the compiled filter go; the same filter compiles anew.
    again = AllowedRows(mask.copy())
    assert indexes.ready(again)
    assert indexes.search(queries, K, again) is not None


def test_builds_pause_in_proportion_to_their_time(items: np.ndarray, queries: np.ndarray) -> None:
    indexes = FilterIndexes(items, after=1, max_rows=N)
    indexes.pause = 1e6  # after any build, none for a very long time
    first, second = AllowedRows(_mask(0.1, seed=3)), AllowedRows(_mask(0.1, seed=4))
    for allowed in (first, second, second, second):
        indexes.search(queries, K, allowed)
        indexes.wait(60)
    assert indexes.ready(first) and not indexes.ready(second)
    indexes._idle_until = 0.0  # the pause over (rather than a test that waits it out)
    indexes.search(queries, K, second)  # its uses were counted meanwhile
    indexes.wait(60)
    assert indexes.ready(second)


def test_a_failed_build_leaves_the_graph_serving_and_is_not_retried(
    items: np.ndarray, queries: np.ndarray, hnsw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[int] = []

    def failing(matrix: np.ndarray, rows: np.ndarray) -> Any:
        builds.append(len(rows))
        raise RuntimeError("k-means failed")

    monkeypatch.setattr("app.search.filter_index.build_filter_index", failing)
    index = FaissIndex(hnsw, items, "hnsw", filter_index_after=1)
    allowed = AllowedRows(_mask(0.1))
    for _ in range(3):
        _, rows = index.search(queries, K, allowed)
        index.filter_indexes.wait(60)
        assert allowed.mask[rows[rows >= 0]].all()
    assert len(builds) == 1
    assert not index.filter_indexes.ready(allowed)

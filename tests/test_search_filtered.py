"""Filtered search in every index, at every selectivity: only allowed rows; exact where the
index is exact (flat: gathered, masked, pruned by clusters); and through `retrieval.search`,
exactly k allowed unseen items from an approximate index too."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import torch
from helpers_vectors import clustered_items, queries_near

from app.config import IndexConfig
from app.filters import CompiledFilter
from app.model import ServingModel
from app.retrieval import Query, search
from app.search import AllowedRows, FaissIndex, FlatIndex, build_faiss_index, faiss_index
from app.search.cluster_pruning import ClusterPruning
from app.search.item_index import exact_allowed
from models.bundle import read_latest

N, DIM, K = 20_000, 16, 50
SHARES = (0.5, 0.1, 0.02, 0.001, 0.0)
ANN_MIN_SHARE = faiss_index.ANN_MIN_SHARE  # as chosen, before a test forces another


@pytest.fixture(scope="module")
def items() -> np.ndarray:
    return clustered_items(N, DIM, noise=0.3)


@pytest.fixture(scope="module")
def queries(items: np.ndarray) -> np.ndarray:
    return queries_near(items)


def _mask(share: float, seed: int = 2) -> AllowedRows:
    mask = np.random.default_rng(seed).random(N) < share
    return AllowedRows(mask)


def _brute(items: np.ndarray, queries: np.ndarray, allowed: AllowedRows, k: int) -> np.ndarray:
    scores = queries @ items.T
    scores[:, ~allowed.mask] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(scores, order, 1) > -np.inf, order, -1)


def _flat_indexes(items: np.ndarray) -> dict[str, FlatIndex]:
    matrix = torch.from_numpy(items)
    ivf = build_faiss_index(items, IndexConfig(kind="ivf", ivf_nlist=128))
    return {
        "scan": FlatIndex(matrix, screen="off"),
        "pruned": FlatIndex(matrix, screen="off", pruning=ClusterPruning(ivf, items)),
    }


@pytest.fixture(params=["chosen", "forced"])
def paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The indexes' own choice of path per share, or their non-exact paths forced at every
    share (clusters, selectors): a 20k-item catalogue would otherwise keep every filter's rows
    and scan them."""
    if request.param == "forced":
        monkeypatch.setattr("app.search.allowed.MAX_GATHERED_ROWS", 0)
        monkeypatch.setattr("app.search.flat.PRUNE_MIN_SHARE", -1.0)
        monkeypatch.setattr("app.search.faiss_index.ANN_MIN_SHARE", 0.0)
    return str(request.param)


@pytest.mark.parametrize("share", SHARES)
def test_flat_is_exact_under_any_filter(
    items: np.ndarray, queries: np.ndarray, share: float, paths: str
) -> None:
    allowed = _mask(share)
    want = _brute(items, queries, allowed, K)
    for name, index in _flat_indexes(items).items():
        scores, rows = index.search(queries, K, allowed)
        assert rows.shape == (len(queries), K)
        np.testing.assert_array_equal(rows, want, err_msg=name)
        assert np.isneginf(scores[rows < 0]).all()
    # The exact scan of a subset, every way it runs: gathered, masked (a batch), and FAISS's
    # scan with the selector (a lone query).
    for gather in (0.0, 1.0):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("app.search.item_index.GATHER_MAX_SHARE", gather)
            _, rows = exact_allowed(torch.from_numpy(items), queries, K, allowed)
            np.testing.assert_array_equal(rows, want)
            for i in range(3):
                one = queries[i : i + 1]
                scores, rows = exact_allowed(torch.from_numpy(items), one, K, allowed)
                np.testing.assert_array_equal(rows[0], want[i])
                assert np.isneginf(scores[rows < 0]).all()


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
@pytest.mark.parametrize("share", SHARES)
def test_ann_returns_only_allowed_rows_with_high_recall(
    items: np.ndarray, queries: np.ndarray, kind: str, share: float, paths: str
) -> None:
    config = IndexConfig(kind=kind, hnsw_m=16, hnsw_ef_search=64, ivf_nlist=128, ivf_nprobe=8)
    index = FaissIndex(build_faiss_index(items, config), items, kind)  # type: ignore[arg-type]
    allowed = _mask(share)
    _, rows = index.search(queries, K, allowed)
    found = rows[rows >= 0]
    assert allowed.mask[found].all()
    want = _brute(items, queries, allowed, K)
    hits = sum(len(set(r[r >= 0]) & set(w[w >= 0])) for r, w in zip(rows, want, strict=True))
    if paths == "chosen" or share >= ANN_MIN_SHARE:  # where the selector serves
        assert hits >= 0.95 * (want >= 0).sum()


def test_a_short_filtered_answer_is_searched_deeper_before_any_exact_fill(
    items: np.ndarray, queries: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.search.allowed.MAX_GATHERED_ROWS", 0)  # the selector, not a scan
    config = IndexConfig(kind="hnsw", hnsw_m=16, hnsw_ef_search=64)
    index = FaissIndex(build_faiss_index(items, config), items, "hnsw")
    # The first answer comes back short, as the 1M benchmark's clustered category filter's
    # does for ~3 % of queries; each search's efSearch is recorded.
    search, ef_searches = index.faiss.search, []

    def short_once(vectors: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
        ef_searches.append(params.efSearch)
        scores, rows = search(vectors, k, params=params)
        if len(ef_searches) == 1:
            scores[:, -1], rows[:, -1] = -np.inf, -1
        return scores, rows

    index.faiss.search = short_once
    allowed = AllowedRows(np.random.default_rng(2).random(N) < 0.4)
    scores, rows = index.search(queries, K, allowed)
    depth = max(config.hnsw_ef_search, K)  # searched as deep in allowed items as unfiltered
    deeper = math.ceil(depth * faiss_index.RETRY_DEPTHS[0] / allowed.share)
    assert ef_searches == [math.ceil(depth / allowed.share), deeper]
    assert (rows >= 0).all() and allowed.mask[rows].all()  # the retry answered in full
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_selector_skips_rows_past_the_mask() -> None:
    allowed = AllowedRows(np.array([False, True, False, True, True]))
    members = [i for i in range(16) if allowed.selector().is_member(i)]
    assert members == [1, 3, 4]
    assert allowed.allowed_among(frozenset({0, 3, 4})) == 2
    assert isinstance(allowed.selector(), faiss.IDSelectorBitmap)
    matrix = torch.arange(10.0).reshape(5, 2)
    kept = allowed.gathered(matrix)
    assert kept.tolist() == [[2.0, 3.0], [6.0, 7.0], [8.0, 9.0]]
    assert allowed.gathered(matrix) is kept  # gathered once per filter and matrix
    assert allowed.gathered(matrix.clone()) is not kept


@pytest.mark.parametrize("kept", [True, False])
@pytest.mark.parametrize("share", (0.5, 0.1, 0.02, 0.001))
def test_exact_top_is_the_brute_force_top_k_of_allowed_unexcluded_rows(
    items: np.ndarray,
    queries: np.ndarray,
    share: float,
    kept: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The fill of a short ANN answer: gathered (kept or not) or FAISS's selector scan, each
    # with seen rows among the allowed ones and the best of them excluded.
    if not kept:
        monkeypatch.setattr("app.search.allowed.MAX_GATHERED_ROWS", 0)
    index = FlatIndex(torch.from_numpy(items), screen="off")
    allowed = _mask(share)
    for vector in queries:
        best = _brute(items, vector[None], allowed, 2 * K)[0]
        exclude = frozenset(best[best >= 0][::2].tolist()) | {int(np.flatnonzero(~allowed.mask)[0])}
        scores, rows = index.exact_top(vector, K, exclude, allowed)
        mask = allowed.mask.copy()
        mask[list(exclude)] = False
        want = _brute(items, vector[None], AllowedRows(mask), K)[0]
        assert rows == want[want >= 0].tolist()
        assert np.allclose(scores, items[rows] @ vector, atol=1e-5)


def test_retrieval_fills_k_allowed_unseen_items_from_a_coarse_graph(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.search.allowed.MAX_GATHERED_ROWS", 0)  # the selector at any share
    monkeypatch.setattr("app.search.faiss_index.ANN_MIN_SHARE", 0.0)
    # efSearch never widened past the depth asked for: a filtered search finds about
    # share x depth allowed rows, too few.
    monkeypatch.setattr("app.search.faiss_index.MAX_FILTERED_EF", 1)
    model = ServingModel.load(model_dir / read_latest(model_dir), IndexConfig())
    rng = np.random.default_rng(4)
    wide = rng.standard_normal((N, model.dim)).astype(np.float32)
    wide /= np.linalg.norm(wide, axis=1, keepdims=True)
    vectors = rng.standard_normal((6, model.dim)).astype(np.float32)
    # efSearch 1 on a graph of degree 4: the selector's answers fall short, the exact
    # fallback fills them (and equals the exact search).
    config = IndexConfig(kind="hnsw", hnsw_m=4, hnsw_ef_search=1, hnsw_ef_construction=4)
    ids = tuple(f"x{i}" for i in range(N))
    hnsw = dataclasses.replace(
        model, index=FaissIndex(build_faiss_index(wide, config), wide, "hnsw"), item_ids=ids
    )
    flat = dataclasses.replace(model, index=FlatIndex(torch.from_numpy(wide)), item_ids=ids)
    fills = []
    real_fill = FaissIndex.exact_top

    def counted_fill(self: FaissIndex, *args: Any, **kwargs: Any) -> Any:
        fills.append(args[1])
        return real_fill(self, *args, **kwargs)

    monkeypatch.setattr(FaissIndex, "exact_top", counted_fill)
    for share in (0.5, 0.1, 0.01):
        allowed = _mask(share, seed=3)
        seen = frozenset(allowed.rows[:20].tolist()) | {0, 1, 2}
        batch = [Query({}, [], [], seen, 60, filter=_compiled(allowed)) for _ in vectors]
        exact = search(flat, vectors, batch)
        for got, want in zip(search(hnsw, vectors, batch), exact, strict=True):
            assert len(got) == len(want) == 60
            rows = [int(item[1:]) for item, _ in got]
            assert allowed.mask[rows].all() and not set(rows) & seen
            assert [item for item, _ in got] == [item for item, _ in want]  # filled exactly
    assert len(fills) == 3 * len(vectors)  # the graph did answer short, and the exact fill ran


def _compiled(allowed: AllowedRows) -> CompiledFilter:
    return CompiledFilter(
        key=str(id(allowed)),
        allowed=allowed,
        include={},
        exclude={},
        ranges={},
        allow_ids=None,
        deny_ids=frozenset(),
        columns={},
    )

"""`FlatIndex`: screening batches in bfloat16, choosing a BLAS, or pruning by clusters never
changes the answer of a float32 scan."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from app.config import IndexConfig
from app.model import ServingModel
from app.search import FlatIndex, build_faiss_index, flat
from app.search.allowed import AllowedRows
from app.search.cluster_pruning import ClusterPruning
from app.search.flat import SCREEN_MIN_BATCH, screen_depth
from app.search.topk import top_candidates
from app.settings import BlasMode
from models.bundle import read_latest


def assert_exact(search: FlatIndex, queries: np.ndarray, k: int) -> None:
    """The answer is a top k: distinct rows, each with its true score, best first, and those
    scores are the k best there are (rows may differ from a reference only among ties)."""
    scores, rows = search.search(queries, k)
    true = queries.astype(np.float64) @ search.matrix.numpy().T.astype(np.float64)
    best = -np.sort(-true, axis=1)[:, :k]
    tolerance = 1e-5 * np.abs(true).max()  # float32 rounding, at the scores' own scale
    for i in range(len(queries)):
        assert len(set(rows[i].tolist())) == k
        assert (np.diff(scores[i]) <= 0).all()  # best first
        np.testing.assert_allclose(scores[i], true[i, rows[i]], rtol=0, atol=tolerance)
        np.testing.assert_allclose(true[i, rows[i]], best[i], rtol=0, atol=tolerance)


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("k", [1, 10, 50, 150])
def test_screened_search_is_exact_on_trained_embeddings(
    model_dir: Path, batch: int, k: int
) -> None:
    model = ServingModel.load(model_dir / read_latest(model_dir), IndexConfig(exact_screen="on"))
    assert isinstance(model.index, FlatIndex) and model.index.screen is not None
    rng = np.random.default_rng(batch * 1000 + k)
    # Users around the cold-start vector, at the tower's own scale.
    queries = model.encode([{}] * batch, [[]] * batch)
    queries = queries + 0.3 * rng.standard_normal(queries.shape).astype(np.float32)
    assert_exact(model.index, queries, k)
    # The screen serves batches from SCREEN_MIN_BATCH up whose candidate depth leaves some
    # items out; the other cases take the float32 scan, which must be exact as well.
    screens = batch >= SCREEN_MIN_BATCH and screen_depth(k) < model.n_items
    assert model.index.screen_fallbacks.queries == (batch if screens else 0)


@pytest.mark.parametrize("blas", ["torch", "numpy"])
@pytest.mark.parametrize("batch", [1, 3, 9])
def test_float32_scan_is_exact_over_either_library(batch: int, blas: BlasMode) -> None:
    rng = np.random.default_rng(batch)
    matrix = rng.standard_normal((20_000, 65), dtype=np.float32)
    search = FlatIndex(torch.from_numpy(matrix), "off", blas=blas)
    assert set(search.blas.values()) == {blas}
    assert search.columns.is_contiguous()  # the column-major copy the scan reads
    queries = rng.standard_normal((batch, 65), dtype=np.float32)
    for k in (1, 180):
        assert_exact(search, queries, k)


def test_auto_times_both_libraries_at_every_batch_size(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(2)
    matrix = rng.standard_normal((30_000, 33), dtype=np.float32)
    with caplog.at_level(logging.INFO, logger="app.search.flat"):
        search = FlatIndex(torch.from_numpy(matrix), "off")
    assert sorted(search.blas) == list(flat.TIMED_BATCHES)
    assert set(search.blas.values()) <= {"torch", "numpy"}
    assert "torch/numpy ms" in caplog.text
    # Whatever was chosen, batches between and beyond the timed sizes are exact.
    for batch in (5, 17):
        assert_exact(search, rng.standard_normal((batch, 33), dtype=np.float32), 40)


def test_top_candidates_through_block_maxima_are_the_top_values() -> None:
    rng = np.random.default_rng(0)
    n = 100_003  # a partial last block, which holds some of the best values
    scores = torch.from_numpy(rng.standard_normal((5, n), dtype=np.float32))
    scores[:, -3:] = 10.0
    scores[1, :5000] = 0.5  # many ties
    values, columns = top_candidates(scores, 60)
    want = torch.topk(scores, 60, dim=1).values
    assert torch.equal(values.sort(dim=1, descending=True).values, want)
    assert torch.equal(scores.gather(1, columns), values)
    assert all(len(set(row.tolist())) == 60 for row in columns)


@pytest.mark.parametrize("screen", ["on", "off"])
def test_a_batch_too_big_to_score_at_once_is_scanned_in_slices(
    monkeypatch: pytest.MonkeyPatch, screen: str
) -> None:
    """Its scores are bounded by SCAN_BYTES (a batch of 256 over 1M items held ~1.5 GB more
    at once), and the answers are the same exact top k, in the batch's order."""
    rng = np.random.default_rng(5)
    matrix = rng.standard_normal((20_000, 32), dtype=np.float32)
    monkeypatch.setattr(flat, "SCAN_BYTES", 6 * len(matrix) * 4)  # four queries a slice
    search = FlatIndex(torch.from_numpy(matrix), screen)  # type: ignore[arg-type]
    scored: list[int] = []  # queries per (B, n_items) product
    product = search._product
    monkeypatch.setattr(search, "_product", lambda q: scored.append(len(q)) or product(q))
    queries = rng.standard_normal((11, 32), dtype=np.float32)
    for k in (1, 40):
        assert_exact(search, queries, k)
    allowed = AllowedRows(rng.random(len(matrix)) < 0.5)
    scores, rows = search.search(queries, 20, allowed)
    true = queries @ matrix.T
    true[:, ~allowed.mask] = -np.inf
    np.testing.assert_allclose(scores, -np.sort(-true, axis=1)[:, :20], rtol=0, atol=1e-4)
    assert allowed.mask[rows].all()
    assert scored and max(scored) <= 4


def test_screened_search_is_exact_on_a_large_catalogue() -> None:
    rng = np.random.default_rng(1)
    factors = rng.standard_normal((8, 32), dtype=np.float32)
    matrix = rng.standard_normal((60_000, 8), dtype=np.float32) @ factors
    matrix += 0.3 * rng.standard_normal(matrix.shape, dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    search = FlatIndex(torch.from_numpy(matrix), "on")
    queries = matrix[rng.integers(0, len(matrix), 12)] + 0.1
    for k in (5, 50):
        assert_exact(search, queries, k)
    # Well-separated scores: every answer certified by the screen alone.
    assert (search.screen_fallbacks.queries, search.screen_fallbacks.scanned) == (24, 0)


def test_items_bfloat16_cannot_tell_apart_are_rescanned_in_float32() -> None:
    # Scores 1 + i * 1e-6: identical once rounded to bfloat16, so the screen's candidates are
    # arbitrary and the bound cannot certify them; the answer must still be the exact one.
    n = 5000
    matrix = np.zeros((n, 8), dtype=np.float32)
    matrix[:, 0] = 1.0 + np.arange(n, dtype=np.float32) * 1e-6
    search = FlatIndex(torch.from_numpy(matrix), "on")
    queries = np.tile(np.eye(8, dtype=np.float32)[:1], (6, 1))
    _, rows = search.search(queries, 20)
    assert (rows == np.arange(n - 1, n - 21, -1)).all()
    assert search.screen_fallbacks.scanned == 6
    assert_exact(search, queries, 20)


def test_products_too_small_for_bfloat16_are_rescanned() -> None:
    # Coordinates ~1e-19: products under float32's normal range, flushed to zero when
    # screened, so every screened score is 0 while the true ones (~1e-38) differ.
    rng = np.random.default_rng(2)
    matrix = (rng.random((5000, 16), dtype=np.float32) * 1e-19).astype(np.float32)
    search = FlatIndex(torch.from_numpy(matrix), "on")
    queries = (rng.random((8, 16), dtype=np.float32) * 1e-19).astype(np.float32)
    assert_exact(search, queries, 10)


def test_a_screen_that_keeps_rescanning_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flat, "RESCAN_SAMPLE", 12)
    matrix = np.zeros((5000, 8), dtype=np.float32)
    matrix[:, 0] = 1.0 + np.arange(5000, dtype=np.float32) * 1e-6
    search = FlatIndex(torch.from_numpy(matrix), "on")
    queries = np.tile(np.eye(8, dtype=np.float32)[:1], (6, 1))
    search.search(queries, 20)
    assert search.screen is not None  # 6 queries: too few to judge
    search.search(queries, 20)
    assert search.screen is None
    assert_exact(search, queries, 20)


@pytest.mark.parametrize("dim", [16, 65, 256])
def test_screened_scores_stay_within_the_bound_the_answer_relies_on(dim: int) -> None:
    rng = np.random.default_rng(dim)
    matrix = rng.standard_normal((20_000, dim), dtype=np.float32)
    matrix[:, -1] *= 20  # a large coordinate, like a folded popularity prior
    search = FlatIndex(torch.from_numpy(matrix), "on")
    assert search.screen is not None
    queries = torch.from_numpy(rng.standard_normal((16, dim), dtype=np.float32))
    screened = (queries.to(torch.bfloat16) @ search.screen.T).double()
    true = queries.double() @ torch.from_numpy(matrix).double().T
    error = (screened - true).abs().amax(dim=1)
    assert (error <= search.slack * queries.norm(dim=1).double()).all()


def test_the_bound_holds_when_every_rounding_error_lines_up() -> None:
    # 1 + 2^-8 - 2^-20 rounds down to 1 in bfloat16 (an error of nearly u = 2^-8): 15 such
    # products lose ~2u each, and the last coordinate puts the float32 sum 16.0546875 just
    # under a bfloat16 rounding midpoint (16.0625), so the result rounds down once more.
    down = 1.0 + 2.0**-8 - 2.0**-20
    query = np.full((1, 16), down, dtype=np.float32)
    items = np.full((300, 16), down, dtype=np.float32)
    items[:, -1] = 1.0546875
    search = FlatIndex(torch.from_numpy(items), "on")
    assert search.screen is not None
    q = torch.from_numpy(query)
    screened = float((q.to(torch.bfloat16) @ search.screen[:1].T).double())
    true = float(q.double() @ torch.from_numpy(items[:1]).double().T)
    norms = float(np.linalg.norm(query)) * float(np.linalg.norm(items[0]))
    error = true - screened
    assert error > 2.7 * 2.0**-8 * norms  # most of the bound is used...
    assert error <= search.slack * float(np.linalg.norm(query))  # ...and it holds


def test_screening_is_on_off_or_measured(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    matrix = torch.from_numpy(rng.standard_normal((4000, 16), dtype=np.float32))
    assert FlatIndex(matrix, "off").screen is None
    on = FlatIndex(matrix, "on")
    assert on.screen is not None and on.screen.dtype == torch.bfloat16
    # auto keeps the copy only when screening measured faster than scanning here, and says so.
    with caplog.at_level(logging.INFO, logger="app.search.flat"):
        auto = FlatIndex(matrix, "auto")
    kept = "screens in bfloat16" if auto.screen is not None else "scans in float32"
    assert kept in caplog.text
    queries = rng.standard_normal((8, 16), dtype=np.float32)
    for search in (on, auto):
        assert_exact(search, queries, 30)


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 64 "genres", and a popularity column: the shape of trained item
    vectors with a folded prior."""
    rng = np.random.default_rng(seed)
    genres = rng.standard_normal((64, dim - 1))
    genres /= np.linalg.norm(genres, axis=1, keepdims=True)
    x = genres[rng.integers(0, 64, n)] + 0.3 * rng.standard_normal((n, dim - 1)) / dim**0.5
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    prior = 0.05 * np.log1p(rng.zipf(1.5, n).clip(max=10_000))
    return np.ascontiguousarray(np.column_stack([x, prior]), dtype=np.float32)


def pruned(matrix: np.ndarray, nlist: int) -> FlatIndex:
    ivf = build_faiss_index(matrix, IndexConfig(kind="ivf", ivf_nlist=nlist))
    return FlatIndex(torch.from_numpy(matrix), "off", pruning=ClusterPruning(ivf, matrix))


@pytest.mark.parametrize("batch", [1, 5, 16])
def test_pruning_by_clusters_is_exact_and_reads_a_fraction(batch: int) -> None:
    matrix = clustered(30_000, 33, seed=batch)
    search = pruned(matrix, 256)
    assert search.pruning is not None
    # Users near the items, as a trained tower puts them, with the prior's constant 1.
    rng = np.random.default_rng(batch)
    queries = matrix[rng.integers(0, len(matrix), batch), :-1] * 10
    queries += rng.standard_normal(queries.shape).astype(np.float32)
    queries = np.column_stack([queries, np.ones(batch)]).astype(np.float32)
    for k in (1, 50, 180):
        assert_exact(search, queries, k)
    pruning = search.pruning
    assert (search.prune_fallbacks.queries, search.prune_fallbacks.scanned) == (3 * batch, 0)
    assert pruning.probed / pruning.queries < 0.1 * pruning.nlist  # it did prune


def test_queries_the_bounds_cannot_prune_are_scanned_and_pruning_that_never_pays_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flat, "RESCAN_SAMPLE", 8)
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((20_000, 32), dtype=np.float32)  # no clusters to speak of
    search = pruned(matrix, 128)
    queries = rng.standard_normal((6, 32), dtype=np.float32)
    assert_exact(search, queries, 50)  # every query scanned in full, still exact
    assert search.prune_fallbacks.scanned == 6  # every query scanned in full
    assert search.pruning is not None  # 6 queries: too few to judge
    assert_exact(search, queries, 50)
    assert search.pruning is None  # 12 of 12 scanned: pruning is dropped


def test_a_loaded_flat_bundle_prunes_from_its_cached_clusters(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = model_dir / read_latest(model_dir)
    config = IndexConfig(exact_prune="on", ivf_nlist=8)
    first = ServingModel.load(path, config)
    assert isinstance(first.index, FlatIndex) and first.index.pruning is not None
    assert any(p.name.startswith("ivf-nlist8-") for p in (path / "index-cache").iterdir())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app"):
        again = ServingModel.load(path, config)
    how = [m for r in caplog.records if (m := r.getMessage()).startswith("ivf index")]
    assert len(how) == 1 and "read from the cache" in how[0], how  # not clustered again
    plain = ServingModel.load(path, IndexConfig(exact_prune="off"))
    assert isinstance(plain.index, FlatIndex) and plain.index.pruning is None
    rng = np.random.default_rng(0)
    queries = plain.encode([{}] * 4, [[]] * 4)
    queries = queries + 0.3 * rng.standard_normal(queries.shape).astype(np.float32)
    for model in (first, again):
        assert isinstance(model.index, FlatIndex)
        assert_exact(model.index, queries, 10)
        np.testing.assert_array_equal(
            model.index.search(queries, 10)[1][:, :3], plain.index.search(queries, 10)[1][:, :3]
        )

"""`retrieval.search` on a batch: each query's answer is the one it gets alone. Deleted
catalogue rows (the overlay's, excluded per query or masked) are never returned, and what is
returned is the top k of what remains with the added items, in every index (real FAISS)."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Bundles

from app.config import IndexConfig
from app.filters import CompiledFilter
from app.model import ServingModel
from app.retrieval import Query, merge_overlay, search
from app.search import AllowedRows, FaissIndex, FlatIndex, ItemIndex, build_faiss_index, overlay
from app.search.overlay import overlay_of
from models.bundle import read_latest


def test_hnsw_answers_do_not_depend_on_the_batch(model_dir: Path) -> None:
    model = ServingModel.load(model_dir / read_latest(model_dir), IndexConfig())
    # Random item vectors and a coarse graph: approximate answers, which must still be each
    # query's own whatever depth the others in its batch need.
    rng = np.random.default_rng(0)
    items = rng.standard_normal((20_000, model.dim), dtype=np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    config = IndexConfig(kind="hnsw", hnsw_m=4, hnsw_ef_search=1, hnsw_ef_construction=4)
    hnsw = dataclasses.replace(
        model,
        index=FaissIndex(build_faiss_index(items, config), items, "hnsw"),
        item_ids=tuple(f"x{i}" for i in range(len(items))),
    )
    queries = [Query({}, [], [], frozenset(), k) for k in (1, 2, 3, 60) for _ in range(10)]
    vectors = rng.standard_normal((len(queries), model.dim), dtype=np.float32)
    batched = search(hnsw, vectors, queries)
    alone = [search(hnsw, vectors[i : i + 1], [q])[0] for i, q in enumerate(queries)]
    assert batched == alone


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_seen_items_older_than_the_tower_reads_are_excluded_by_id(
    model_dir: Path, kind: str
) -> None:
    """The tower reads the newest `history_length` known items (rows; an unknown id among
    them is skipped, as training skips it); the older ones, an unknown id and a repeat among
    them, are excluded by id: the answer is the exact top of every unseen item, as many as
    there are, though the candidates run short of them."""
    model = ServingModel.load(model_dir / read_latest(model_dir), IndexConfig(kind=kind))
    ids, read = list(model.item_ids), model.encoder.history_length
    newest = [ids[0], "added-later", *ids[1:read]]
    history = [*newest, "not-an-item", ids[0], *ids[read : read + 40], "gone"]
    query = Query.prepare(model, {}, history, len(ids))
    assert list(query.history) == newest and list(query.history_rows) == list(range(read))
    assert len(query.exclude) == read
    assert query.older_seen == {"not-an-item", ids[0], *ids[read : read + 40], "gone"}
    vector = model.encode([{}], history_rows=[query.history_rows])
    scores = model.index.matrix @ torch.from_numpy(vector[0])
    order = np.argsort(-np.asarray(scores), kind="stable")
    unseen = [ids[row] for row in order if ids[row] not in set(history)]
    (got,) = search(model, vector, [query])
    assert [item for item, _ in got] == unseen  # 200 - 140 items, in the exact order


# Deleted catalogue rows: per-query exclusions below MASK_MIN_ROWS, the overlay's mask from it.

N, DIM, K = 20_000, 16, 60
ADDED = 30


@dataclass(frozen=True)
class Catalogue:
    """A bundle's serving model over N random items, in every index kind, with added items."""

    base: ServingModel
    items: np.ndarray
    indexes: dict[str, ItemIndex]
    added: np.ndarray
    vectors: np.ndarray
    histories: list[list[str]]

    def model(self, kind: str, deleted: Sequence[int]) -> ServingModel:
        ids = [f"new-{i}" for i in range(ADDED)]
        attributes: list[dict[str, str]] = [{} for _ in ids]
        built = overlay_of(ids, self.added, attributes, deleted, 1, {}, N)
        return dataclasses.replace(
            self.base,
            index=self.indexes[kind],
            item_ids=tuple(f"x{i}" for i in range(N)),
            overlay=built,
        )


@pytest.fixture(scope="module")
def catalogue(bundles: Bundles) -> Catalogue:
    base = ServingModel.load(bundles.v1, IndexConfig())
    rng = np.random.default_rng(5)
    items = rng.standard_normal((N, DIM), dtype=np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    config = IndexConfig(hnsw_m=16, hnsw_ef_search=64, ivf_nlist=64, ivf_nprobe=32)
    indexes: dict[str, ItemIndex] = {"flat": FlatIndex(torch.from_numpy(items), screen="off")}
    for kind in ("hnsw", "ivf"):
        built = build_faiss_index(items, dataclasses.replace(config, kind=kind))
        indexes[kind] = FaissIndex(built, items, kind)
    added = rng.standard_normal((ADDED, DIM), dtype=np.float32)
    added /= np.linalg.norm(added, axis=1, keepdims=True)
    vectors = rng.standard_normal((8, DIM), dtype=np.float32)
    # Bundle items (catalogue rows 0..9 + i) and an added item, seen.
    known = list(base.item_ids)
    histories = [[*known[i : i + 10], "new-0"] for i in range(len(vectors))]
    return Catalogue(base, items, indexes, added, vectors, histories)


def _deleted(catalogue: Catalogue, count: int) -> list[int]:
    """`count` rows, the queries' best first (round robin), a few of them seen items."""
    if count == 0:
        return []
    order = np.argsort(-(catalogue.vectors @ catalogue.items.T), axis=1)[:, :20]
    picked = dict.fromkeys([0, 1, 2, *order.T.flatten().tolist()])  # rows 0-2 seen by query 0
    rest = np.random.default_rng(count).permutation(N).tolist()
    return list(dict.fromkeys([*picked, *rest]))[:count]


def _compiled(allowed: AllowedRows) -> CompiledFilter:
    return CompiledFilter("f", allowed, {}, {}, {}, None, frozenset(), {})


def _brute(
    catalogue: Catalogue, model: ServingModel, query: Query, i: int, allowed: np.ndarray | None
) -> list[str]:
    """The top k of the bundle's rows (allowed, not deleted, unseen) and the added items
    (unseen), by exact score."""
    vector = catalogue.vectors[i]
    keep = np.ones(N, dtype=bool) if allowed is None else allowed.copy()
    keep[list(model.overlay.masked)] = False
    keep[list(query.history_rows)] = False
    added_keep = np.ones(ADDED, dtype=bool)
    added_keep[list(query.overlay_exclude)] = False
    ids = np.array([*model.item_ids, *model.overlay.ids])
    scores = np.concatenate([catalogue.items @ vector, catalogue.added @ vector])
    scores[~np.concatenate([keep, added_keep])] = -np.inf
    order = np.argsort(-scores, kind="stable")
    return [str(ids[j]) for j in order[: min(K, int(np.isfinite(scores).sum()))]]


def _counts() -> list[int]:
    return [0, 7, overlay.MASK_MIN_ROWS - 1, overlay.MASK_MIN_ROWS, 3000]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
@pytest.mark.parametrize("count", _counts())
@pytest.mark.parametrize("share", [None, 0.3, 0.002])
@pytest.mark.parametrize("gathered", [True, False], ids=["kept", "selector"])
def test_deleted_rows_are_never_returned_and_the_rest_is_the_top_k(
    catalogue: Catalogue,
    kind: str,
    count: int,
    share: float | None,
    gathered: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Below and above MASK_MIN_ROWS, filtered or not, single and batch: exactly min(k,
    eligible) items, none deleted or seen; flat's are the brute-force top k, an ANN index's
    mostly."""
    if not gathered:  # a 20k catalogue keeps every mask's rows: the ANN selector paths too
        monkeypatch.setattr("app.search.allowed.MAX_GATHERED_ROWS", 0)
    model = catalogue.model(kind, _deleted(catalogue, count))
    assert (model.overlay.allowed is not None) == (count >= overlay.MASK_MIN_ROWS)
    mask = None if share is None else np.random.default_rng(6).random(N) < share
    rows_filter = None if mask is None else _compiled(AllowedRows(mask))
    queries = [
        Query.prepare(model, {}, history, K, filter=rows_filter) for history in catalogue.histories
    ]
    vectors = catalogue.vectors
    batch = merge_overlay(model, vectors, queries, search(model, vectors, queries))
    hits = wanted = 0
    for i, (query, found) in enumerate(zip(queries, batch, strict=True)):
        alone = merge_overlay(
            model, vectors[i : i + 1], [query], search(model, vectors[i : i + 1], [query])
        )[0]
        assert [item for item, _ in alone] == [item for item, _ in found]
        np.testing.assert_allclose([s for _, s in alone], [s for _, s in found], atol=1e-5)
        want = _brute(catalogue, model, query, i, mask)
        got = [item for item, _ in found]
        assert len(got) == len(set(got)) == len(want)
        deleted_ids = {model.item_ids[row] for row in model.overlay.masked}
        seen = set(catalogue.histories[i]) | {model.item_ids[r] for r in query.history_rows}
        assert not set(got) & (deleted_ids | seen)
        if mask is not None:
            assert all(mask[int(item[1:])] for item in got if item.startswith("x"))
        if kind == "flat":
            assert got == want
        hits, wanted = hits + len(set(got) & set(want)), wanted + len(want)
    assert hits >= 0.9 * wanted


def test_a_filter_combined_with_an_older_overlay_is_never_used_after_new_deletions(
    catalogue: Catalogue,
) -> None:
    first = catalogue.model("flat", _deleted(catalogue, overlay.MASK_MIN_ROWS))
    rows_filter = _compiled(AllowedRows(np.random.default_rng(7).random(N) < 0.3))
    query = Query.prepare(first, {}, [], K, filter=rows_filter)
    combined = first.overlay.allowed_with(rows_filter.allowed)
    assert query.allowed is combined  # built once per filter and overlay
    assert Query.prepare(first, {}, [], K, filter=rows_filter).allowed is combined
    (found,) = search(first, catalogue.vectors[:1], [query])
    # Delete what that query found: the next overlay's queries must not return any of it.
    gone = [int(item[1:]) for item, _ in found]
    second = catalogue.model("flat", [*first.overlay.masked, *gone])
    again = Query.prepare(second, {}, [], K, filter=rows_filter)
    assert again.allowed is not combined
    assert again.allowed is not None and not again.allowed.mask[gone].any()
    (refound,) = search(second, catalogue.vectors[:1], [again])
    assert len(refound) == K and not {item for item, _ in refound} & {f"x{r}" for r in gone}
    assert first.overlay.allowed_with(rows_filter.allowed) is combined  # the old one's own


def test_a_filters_combined_rows_go_with_the_filter(catalogue: Catalogue) -> None:
    """Per-request filters (a user's own deny list) must not pile up one catalogue-sized mask
    each on the overlay: its table of combined rows lets an entry go with its filter (it kept
    every filter ever searched until the next item change, ~2 MB each at 1M items)."""
    model = catalogue.model("flat", _deleted(catalogue, overlay.MASK_MIN_ROWS))
    rng = np.random.default_rng(3)
    kept = _compiled(AllowedRows(rng.random(N) < 0.5))
    gone = []
    for _ in range(20):
        rows_filter = _compiled(AllowedRows(rng.random(N) < 0.5))
        query = Query.prepare(model, {}, [], K, filter=rows_filter)
        assert query.allowed is not None and query.allowed.base is rows_filter.allowed
        gone.append(weakref.ref(query.allowed))
    Query.prepare(model, {}, [], K, filter=kept)
    del rows_filter, query
    gc.collect()
    assert [ref() for ref in gone] == [None] * 20
    assert len(model.overlay._combined) == 1  # the filter still held


def test_the_overlay_masks_deleted_rows_only_from_mask_min_rows() -> None:
    empty = np.zeros((0, 4), np.float32)
    few = overlay_of([], empty, [], range(overlay.MASK_MIN_ROWS - 1), 1, {}, 5000)
    assert few.allowed is None and few.excluded == few.masked
    assert few.allowed_with(None) is None
    many = overlay_of([], empty, [], range(overlay.MASK_MIN_ROWS), 1, {}, 5000)
    assert many.excluded == frozenset() and many.allowed is not None
    assert many.allowed.count == 5000 - overlay.MASK_MIN_ROWS
    assert not many.allowed.mask[: overlay.MASK_MIN_ROWS].any()
    assert many.allowed_with(None) is many.allowed
    assert overlay_of([], empty, [], [], 1, {}, 5000).allowed is None

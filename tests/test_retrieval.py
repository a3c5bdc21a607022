"""`retrieval.search` on a batch: each query's answer is the one it gets alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from app.config import IndexConfig
from app.model import ServingModel
from app.retrieval import Query, search
from app.search import FaissIndex, build_faiss_index
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

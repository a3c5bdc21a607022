"""`build_item_index`: the one place that decides which search serves a bundle.

- `flat`: exact search (`FlatIndex`) over the memory-mapped embeddings (pages shared by every
  worker) and a column-major copy that each worker scans (private, the matrix's size again;
  its bfloat16 screen, where used, half that). From PRUNE_MIN_ITEMS items (EXACT_PRUNE=auto)
  it reads only the k-means clusters that can hold a query's top k: an IVF index, the
  matrix's size again, cached like the ANN indexes.
- `hnsw`, `ivf`: a FAISS index (`FaissIndex`), read from the on-disk ANN cache when a valid
  one is there, else built with every core and cached for the next start.

Runs off the event loop (start-up and reload load bundles in a worker thread).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np

from app.config import IndexConfig
from app.errors import BundleRejected
from app.search.ann_cache import AnnIndexCache, cache_dir, cache_key, cache_name
from app.search.cluster_pruning import ClusterPruning
from app.search.faiss_index import FaissIndex, build_faiss_index, set_search_params
from app.search.flat import FlatIndex
from app.search.item_index import ItemIndex, shared_tensor
from app.settings import PruneMode

log = logging.getLogger(__name__)

# EXACT_PRUNE=auto prunes flat scans by clusters from this many items up.
PRUNE_MIN_ITEMS = 20_000


def build_item_index(
    embeddings: np.ndarray, config: IndexConfig, *, bundle_dir: Path, checksum: str
) -> ItemIndex:
    """The index over `embeddings` float32 `(n_items, dim)` (read-only; row i = item i) that
    `config` asks for; `bundle_dir` and the embeddings' `checksum` place and key its cache.

    Raises:
        BundleRejected: FAISS could not build the index.
    """
    if config.kind != "flat":
        index = _ann_index(bundle_dir, embeddings, checksum, config)
        return FaissIndex(
            index,
            embeddings,
            config.kind,
            filter_index_after=config.filter_index_after,
            filter_index_rows=config.filter_index_rows,
        )
    pruning = None
    if _prunes(config.exact_prune, len(embeddings)):
        ivf = _ann_index(bundle_dir, embeddings, checksum, replace(config, kind="ivf"))
        pruning = ClusterPruning(ivf, embeddings)
    return FlatIndex(
        shared_tensor(embeddings),
        # A screen would only serve the few queries pruning hands back (timing it at 1M items
        # costs ~1.7 s of every load).
        config.exact_screen if pruning is None else "off",
        blas=config.exact_blas,
        pruning=pruning,
    )


def _prunes(mode: PruneMode, n_items: int) -> bool:
    """Whether a flat index prunes by clusters: below PRUNE_MIN_ITEMS a scan is cheap and the
    clusters few."""
    return mode == "on" or (mode == "auto" and n_items >= PRUNE_MIN_ITEMS)


def _ann_index(
    bundle_dir: Path, embeddings: np.ndarray, checksum: str, config: IndexConfig
) -> faiss.Index:
    """The HNSW/IVF index: from the bundle's cache when valid, else built (and cached for the
    next start when the cache directory is writable)."""
    n_items, dim = embeddings.shape
    cache = AnnIndexCache(
        cache_dir(bundle_dir, config.cache_root),
        cache_name(config, checksum),
        cache_key(config, checksum, n_items, dim),
    )
    start = time.perf_counter()
    index, cached = cache.load_or_build(lambda: _build_with_every_core(embeddings, config))
    how = "read from the cache" if cached else "built"
    log.info("%s index %s in %.1f s", config.kind, how, time.perf_counter() - start)
    set_search_params(index, config)
    return index


def _build_with_every_core(embeddings: np.ndarray, config: IndexConfig) -> faiss.Index:
    # FAISS's OpenMP thread count is per calling thread: this (loader) thread builds with
    # every core, then goes back to what it had, and the serving thread keeps its own.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(config.build_threads or os.cpu_count() or 1)
    try:
        return build_faiss_index(embeddings, config)
    except RuntimeError as exc:  # FAISS reports its errors as RuntimeError
        raise BundleRejected(f"cannot build the {config.kind} index: {exc}") from exc
    finally:
        faiss.omp_set_num_threads(threads)

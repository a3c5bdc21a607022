"""Bundle -> `ServingBundle`: verify, load the TorchScript tower, build the index, warm up.

Everything here runs off the event loop (start-up and reload call it in a worker thread), and
every failure becomes `BundleRejected` with the reason, so a bad bundle never replaces a good one.

Flat search is exact (`app.exact_search`) over the memory-mapped embeddings (pages shared by
every worker) and a column-major copy of them that each worker scans (private, the matrix's
size again; its bfloat16 screen, where used, is half that); from 20,000 items it reads only
the k-means clusters that can hold a query's top k (`app.pruned_search`: an IVF index, the
matrix's size again, cached like the ANN indexes). HNSW and IVF are FAISS indexes; a
built one is cached beside the bundle (`app.index_cache`), and HNSW's own copy of the vectors
doubles as the matrix of the exact fallback (`app.retrieval`), so it is held once.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from app.errors import BundleRejected
from app.exact_search import ExactSearch
from app.index_cache import IndexCache, cache_dir
from app.pruned_search import ClusterPruning
from app.settings import BlasMode, IndexType, PruneMode, ScreenMode, Settings
from models.bundle import ITEM_EMBEDDINGS, BundleError, verify_bundle
from models.features import FeatureEncoder, FeatureSpecError

log = logging.getLogger(__name__)

# k-means wants ~39 training points per list; fewer lists than that for small catalogues.
MIN_POINTS_PER_LIST = 39
# EXACT_PRUNE=auto prunes flat scans by clusters from this many items up.
PRUNE_MIN_ITEMS = 20_000


@dataclass(frozen=True)
class IndexConfig:
    kind: IndexType = "flat"
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    hnsw_ef_construction: int = 200
    ivf_nlist: int = 1024
    ivf_nprobe: int = 32
    build_threads: int = 0  # OpenMP threads for building an ANN index; 0 = every core
    exact_screen: ScreenMode = "auto"  # flat only: see `app.exact_search`
    exact_blas: BlasMode = "auto"  # flat only: see `app.exact_search`
    exact_prune: PruneMode = "auto"  # flat only: see `app.pruned_search`
    cache_root: Path | None = None  # INDEX_CACHE_DIR (`app.index_cache.cache_dir`)

    @classmethod
    def from_settings(cls, s: Settings) -> IndexConfig:
        return cls(
            s.index_type,
            s.hnsw_m,
            s.hnsw_ef_search,
            s.hnsw_ef_construction,
            s.ivf_nlist,
            s.ivf_nprobe,
            s.index_build_threads,
            s.exact_screen,
            s.exact_blas,
            s.exact_prune,
            s.index_cache_dir,
        )

    def cache_name(self, checksum: str) -> str:
        """File stem of the cached index: kind, build parameters, embeddings checksum."""
        if self.kind == "hnsw":
            params = f"M{self.hnsw_m}-efc{self.hnsw_ef_construction}"
        else:
            params = f"nlist{self.ivf_nlist}"
        return f"{self.kind}-{params}-{checksum[:16]}"


def build_index(embeddings: np.ndarray, config: IndexConfig) -> faiss.Index:
    """A FAISS inner-product index over `embeddings` float32 `(n_items, dim)`; row i = id i.
    Search-time parameters (efSearch, nprobe) are set by `set_search_params`."""
    n, dim = embeddings.shape
    index: faiss.Index
    if config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
    elif config.kind == "ivf":
        nlist = max(1, min(config.ivf_nlist, n // MIN_POINTS_PER_LIST))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings)
    else:
        index = faiss.IndexFlatIP(dim)
    index.add(embeddings)
    set_search_params(index, config)
    return index


def set_search_params(index: faiss.Index, config: IndexConfig) -> None:
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = config.hnsw_ef_search
    elif isinstance(index, faiss.IndexIVF):
        index.nprobe = min(config.ivf_nprobe, index.nlist)


@dataclass(frozen=True)
class ServingBundle:
    """One loaded, warmed-up model version; never mutated after construction.

    Attributes:
        version: the bundle's version name.
        path: its directory.
        manifest: parsed manifest.json.
        tower: TorchScript user tower: `Dict[str, Tensor]` -> float32 `(B, dim)`.
        encoder: the shared feature encoder (spec + item index for history).
        index: FAISS inner-product index over the item embeddings; None for flat (`exact`).
        embeddings: float32 `(n_items, dim)`, never written: memory-mapped from the bundle,
            or a view of the HNSW index's own vectors.
        exact: exact search over `embeddings` for flat; for an ANN index it only holds
            `matrix`, which the exact fallback (`app.retrieval`) reads.
        item_ids: external id of each row.
        index_type: flat | hnsw | ivf.
        loaded_at: UNIX time the bundle became ready.
    """

    version: str
    path: Path
    manifest: Mapping[str, Any]
    tower: torch.jit.ScriptModule
    encoder: FeatureEncoder
    index: faiss.Index | None
    embeddings: np.ndarray
    exact: ExactSearch
    item_ids: Sequence[str]
    index_type: IndexType
    loaded_at: float

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def matrix(self) -> torch.Tensor:
        return self.exact.matrix

    def encode(
        self,
        rows: Sequence[Mapping[str, Any]],
        histories: Sequence[Sequence[str]] | None = None,
        *,
        history_rows: Sequence[Sequence[int]] | None = None,
    ) -> np.ndarray:
        """Raw features + histories (item ids newest first, or their catalogue rows as
        `encoder.history_rows` maps them) -> float32 `(B, dim)` user vectors."""
        arrays = self.encoder.encode(rows, histories, history_rows=history_rows)
        with torch.inference_mode():
            out = self.tower({name: torch.from_numpy(a) for name, a in arrays.items()})
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top `k` (at most `n_items`) per row: (scores float32 `(B, k)`, rows int64
        `(B, k)`; an ANN index may return -1 = no result)."""
        if self.index is None:
            return self.exact.search(vectors, k)
        scores, rows = self.index.search(vectors, k)
        return scores, rows


def _build_index(embeddings: np.ndarray, config: IndexConfig) -> faiss.Index:
    # FAISS's OpenMP thread count is per calling thread: this (loader) thread builds with
    # every core, then goes back to what it had, and the serving thread keeps its own.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(config.build_threads or os.cpu_count() or 1)
    try:
        return build_index(embeddings, config)
    except RuntimeError as exc:  # FAISS reports its errors as RuntimeError
        raise BundleRejected(f"cannot build the {config.kind} index: {exc}") from exc
    finally:
        faiss.omp_set_num_threads(threads)


def _ann_index(
    path: Path, embeddings: np.ndarray, checksum: str, config: IndexConfig
) -> faiss.Index:
    """The HNSW/IVF index: from the bundle's cache when valid, else built (and cached for the
    next start when the cache directory is writable)."""
    n_items, dim = embeddings.shape
    key = {
        "embeddings_sha256": checksum,
        "n_items": n_items,
        "dim": dim,
        "kind": config.kind,
        **(
            {"hnsw_m": config.hnsw_m, "ef_construction": config.hnsw_ef_construction}
            if config.kind == "hnsw"
            else {"ivf_nlist": config.ivf_nlist}
        ),
    }
    cache = IndexCache(cache_dir(path, config.cache_root), config.cache_name(checksum), key)
    start = time.perf_counter()
    index, cached = cache.load_or_build(lambda: _build_index(embeddings, config))
    how = "read from the cache" if cached else "built"
    log.info("%s index %s in %.1f s", config.kind, how, time.perf_counter() - start)
    set_search_params(index, config)
    return index


def _prunes(mode: PruneMode, n_items: int) -> bool:
    """Whether a flat index prunes by clusters: below PRUNE_MIN_ITEMS a scan is cheap and the
    clusters few."""
    return mode == "on" or (mode == "auto" and n_items >= PRUNE_MIN_ITEMS)


def _shared_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over `array`'s memory. Read-only (memory-mapped) arrays are fine: nothing
    writes to the matrix, which torch cannot know, hence its warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(array)


def _load_tower(path: Path) -> torch.jit.ScriptModule:
    try:
        tower = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, ValueError, zip errors...
        raise BundleRejected(f"user_tower.pt cannot be loaded: {exc}") from exc
    return tower.eval()


def _warm_up(bundle: ServingBundle) -> None:
    """Encode a cold-start user and one with every feature's largest index and the last item
    as history (a tower whose tables are smaller than the spec and the catalogue fails here,
    not on a user's request), and search with them; TorchScript's profiling executor
    optimises on the first calls, so run a few before declaring the bundle ready."""
    rows = [{}, bundle.encoder.largest_row()]
    histories = [[], [bundle.item_ids[-1], bundle.item_ids[0]]]
    try:
        for batch in (1, 2, 1):
            vectors = bundle.encode(rows[:batch], histories[:batch])
            if vectors.shape != (batch, bundle.dim):
                raise BundleRejected(
                    f"user tower returns shape {tuple(vectors.shape)}, item embeddings have "
                    f"dim {bundle.dim}"
                )
            if not np.isfinite(vectors).all():
                raise BundleRejected("user tower returns non-finite values on warm-up")
            bundle.search(vectors, min(10, bundle.n_items))
    except BundleRejected:
        raise
    except Exception as exc:  # a tower that cannot run the spec's inputs
        raise BundleRejected(f"warm-up failed: {type(exc).__name__}: {exc}") from exc


def load_bundle(path: Path, config: IndexConfig) -> ServingBundle:
    """Verify, load, index and warm up the bundle in `path`.

    Raises:
        BundleRejected: with the reason, for anything that must not be served.
    """
    try:
        verified = verify_bundle(path)
    except BundleError as exc:
        raise BundleRejected(str(exc)) from exc
    except (OSError, EOFError, ValueError) as exc:  # unreadable or truncated files
        raise BundleRejected(f"cannot read the bundle: {type(exc).__name__}: {exc}") from exc
    item_index = {item: row for row, item in enumerate(verified.item_ids)}
    try:
        encoder = FeatureEncoder.from_json(verified.feature_spec, item_index)
    except (FeatureSpecError, AttributeError, TypeError, ValueError) as exc:
        raise BundleRejected(f"feature_spec.json: {exc}") from exc
    tower = _load_tower(verified.user_tower_path)
    embeddings = np.ascontiguousarray(verified.item_embeddings, dtype=np.float32)
    embeddings.setflags(write=False)
    if embeddings.shape[0] == 0:
        raise BundleRejected("the bundle has no items")
    index: faiss.Index | None = None
    pruning: ClusterPruning | None = None
    checksum = verified.manifest["sha256"][ITEM_EMBEDDINGS]
    if config.kind != "flat":
        index = _ann_index(path, embeddings, checksum, config)
        if isinstance(index, faiss.IndexHNSWFlat):
            # HNSW keeps its own copy of the vectors: serve the fallback from it, and let the
            # memory map go, so the matrix is held once.
            storage: Any = faiss.downcast_index(index.storage)
            embeddings = faiss.rev_swig_ptr(storage.get_xb(), embeddings.size).reshape(
                embeddings.shape
            )
            embeddings.setflags(write=False)
    elif _prunes(config.exact_prune, len(embeddings)):
        ivf = _ann_index(path, embeddings, checksum, replace(config, kind="ivf"))
        pruning = ClusterPruning(ivf, embeddings)
    bundle = ServingBundle(
        version=verified.version,
        path=path,
        manifest=verified.manifest,
        tower=tower,
        encoder=encoder,
        index=index,
        embeddings=embeddings,
        exact=ExactSearch(
            _shared_tensor(embeddings),
            # A screen would only serve the few queries pruning hands back (timing it at 1M
            # items costs ~1.7 s of every load).
            config.exact_screen if index is None and pruning is None else "off",
            column_copy=index is None,
            blas=config.exact_blas if index is None else "torch",
            pruning=pruning,
        ),
        item_ids=tuple(verified.item_ids),
        index_type=config.kind,
        loaded_at=time.time(),
    )
    _warm_up(bundle)
    return bundle

"""`AllowedRows`: the catalogue rows a filtered search may return, in the forms searches read.

A recall filter (`app.filters`) compiles to one of these per model version and filter; the
same object then serves every query with that filter, so its derived forms (the sorted rows
for a gathered scan, the bitmap a FAISS `IDSelector` reads) are built once, on first use.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from typing import Any

import faiss
import numpy as np
import torch

# The allowed rows' vectors are kept (a copy) for a filter of at most this many rows, so that
# the same filter on many requests gathers them once, and each query is one small product:
# 32,768 rows of 66 floats take 8.7 MB. (1M items, a 1 % filter, one query: gathering 10k rows
# each time 1.4-3.8 ms; the product over the kept copy ~0.06 ms.)
MAX_GATHERED_ROWS = 32_768


class AllowedRows:
    """Rows `mask` (bool `(n_items,)`, True = may be returned; not copied, never written).

    `base`: the rows these were cut from, when they are a filter's rows less the deleted
    items: what a filter's own index (`app.search.filter_index`) is built over and kept by.
    Held weakly: the overlay keeps these rows in a table keyed weakly by `base`, and a value
    that held its key would keep every filter ever searched alive (~2 MB each at 1M items).
    Were `base` gone mid-search, these rows stand for their own base: the same answers.
    """

    def __init__(self, mask: np.ndarray, base: AllowedRows | None = None) -> None:
        mask.setflags(write=False)
        self.mask = mask
        self._base = None if base is None else weakref.ref(base)
        self.count = int(np.count_nonzero(mask))
        self._rows: np.ndarray | None = None
        self._bits: np.ndarray | None = None
        self._digest: bytes | None = None
        self._selector: Any = None
        self._gathered: tuple[int, torch.Tensor] | None = None  # (matrix's data_ptr, rows)
        self._lock = threading.Lock()  # the event loop and the recall thread may both search

    @property
    def base(self) -> AllowedRows | None:
        return None if self._base is None else self._base()

    @property
    def n_items(self) -> int:
        return len(self.mask)

    @property
    def share(self) -> float:
        """The share of the catalogue allowed (0 for an empty catalogue)."""
        return self.count / max(len(self.mask), 1)

    @property
    def rows(self) -> np.ndarray:
        """The allowed rows, int64, ascending."""
        if self._rows is None:
            with self._lock:
                if self._rows is None:
                    self._rows = np.flatnonzero(self.mask)
        return self._rows

    @property
    def kept(self) -> bool:
        """Whether `gathered` keeps its copy: few enough rows."""
        return self.count <= MAX_GATHERED_ROWS

    def gathered(self, matrix: torch.Tensor) -> torch.Tensor:
        """`matrix[rows]` `(count, dim)`, kept for the next query when `kept` (one model's
        filter meets one matrix; another one is gathered anew)."""
        found = self._gathered
        if found is not None and found[0] == matrix.data_ptr():
            return found[1]
        rows = matrix[torch.from_numpy(self.rows)]
        if self.kept:
            self._gathered = (matrix.data_ptr(), rows)
        return rows

    @property
    def bits(self) -> np.ndarray:
        """The mask packed 8 rows a byte, little-endian bit order (what FAISS's bitmap reads)."""
        if self._bits is None:
            with self._lock:
                if self._bits is None:
                    self._bits = np.packbits(self.mask, bitorder="little")
        return self._bits

    @property
    def digest(self) -> bytes:
        """A 16-byte hash of the mask: equal rows, equal digests, whichever filter made them."""
        if self._digest is None:
            self._digest = hashlib.blake2b(self.bits.data, digest_size=16).digest()
        return self._digest

    def selector(self) -> Any:
        """A FAISS `IDSelectorBitmap` over the mask (ids = rows); it reads the packed bits in
        place, which this object keeps alive as long as the selector."""
        if self._selector is None:
            bits = self.bits
            with self._lock:
                if self._selector is None:
                    # Its size is in bytes of the bitmap; rows past the mask are not members.
                    self._selector = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
        return self._selector

    def allowed_among(self, rows: frozenset[int]) -> int:
        """How many of `rows` are allowed."""
        if not rows:
            return 0
        picked = np.fromiter(rows, dtype=np.int64, count=len(rows))
        return int(np.count_nonzero(self.mask[picked]))

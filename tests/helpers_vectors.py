"""Item and query vectors for search tests: clustered unit vectors, as trained ones are (pruning
by clusters has something to prune), and queries near some of them."""

from __future__ import annotations

import numpy as np


def clustered_items(n: int, dim: int, noise: float, centres: int = 64) -> np.ndarray:
    """`n` unit vectors float32 `(n, dim)` around `centres` random centres, `noise` apart."""
    rng = np.random.default_rng(0)
    middle = rng.standard_normal((centres, dim)).astype(np.float32)
    vectors = middle[rng.integers(centres, size=n)] + noise * rng.standard_normal((n, dim))
    vectors = vectors.astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def queries_near(items: np.ndarray, count: int = 8) -> np.ndarray:
    """`count` queries float32, each a random item moved a little."""
    rng = np.random.default_rng(1)
    picked = items[rng.integers(len(items), size=count)]
    return (picked + 0.1 * rng.standard_normal(picked.shape)).astype(np.float32)

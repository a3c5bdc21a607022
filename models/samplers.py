"""Negative samplers over catalogue rows. Each returns item rows and their log probability."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class NegativeSampler:
    """Draws negatives i.i.d. from a fixed distribution over catalogue rows.

    Args:
        probabilities: `(n_items,)`, non-negative, summing to 1.
        generator: torch generator for reproducible draws.
    """

    def __init__(self, probabilities: np.ndarray, generator: torch.Generator) -> None:
        self.probs = torch.as_tensor(probabilities, dtype=torch.float32)
        self.log_probs = torch.log(self.probs.clamp(min=1e-12))
        self.generator = generator
        self._uniform = bool(torch.allclose(self.probs, self.probs[0].expand_as(self.probs)))

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """Returns `n` item rows `(n,)` int64 and their log q `(n,)`."""
        if self._uniform:
            rows = torch.randint(len(self.probs), (n,), generator=self.generator)
        else:
            rows = torch.multinomial(self.probs, n, replacement=True, generator=self.generator)
        return rows, self.log_probs[rows]


def uniform_sampler(n_items: int, generator: torch.Generator) -> NegativeSampler:
    return NegativeSampler(np.full(n_items, 1.0 / n_items), generator)


def popularity_sampler(
    counts: np.ndarray, generator: torch.Generator, alpha: float = 0.75
) -> NegativeSampler:
    """Sample proportionally to count^alpha (word2vec's 0.75 smoothing); unseen items get 1."""
    weights = np.maximum(counts, 1).astype(np.float64) ** alpha
    return NegativeSampler(weights / weights.sum(), generator)


def in_batch_log_q(counts: np.ndarray) -> Tensor:
    """log q of an item appearing as an in-batch negative: its share of training positives.
    `counts` may be fractional (expected draws under user balancing); items never drawn never
    appear in a batch, and count 1 only to keep the log finite."""
    freq = np.where(counts > 0, counts, 1.0).astype(np.float64)
    return torch.as_tensor(np.log(freq / freq.sum()), dtype=torch.float32)

"""Negative samplers over catalogue rows. Each returns item rows and their log probability.

`negative_sampler` is the one choice of sampler from a config's `negatives`, and
`proposal_log_q` the log q that logQ correction subtracts under it; both training tasks
(`models.interaction_task`, `models.sequence_task`) use them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from models.train_config import NegativesName


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


def negative_sampler(
    negatives: NegativesName, counts: np.ndarray, generator: torch.Generator
) -> NegativeSampler | None:
    """The sampler `negatives` draws from (None: `in-batch` and `all` sample nothing).

    Args:
        negatives: `TrainConfig.negatives`.
        counts: `(n_items,)` training interactions per item (the popularity sampler's).
        generator: torch generator for reproducible draws.
    """
    if negatives == "uniform":
        return uniform_sampler(len(counts), generator)
    if negatives in ("popularity", "mixed"):
        return popularity_sampler(counts, generator)
    return None


def proposal_log_q(
    negatives: NegativesName, in_batch_logq: Tensor, sampler: NegativeSampler | None
) -> Tensor:
    """`(n_items,)` log probability of each item under the negatives' proposal distribution:
    what logQ correction subtracts from every candidate's logit, the positive's included."""
    if negatives == "in-batch" or sampler is None:
        return in_batch_logq
    if negatives == "mixed":
        return torch.logaddexp(in_batch_logq, sampler.log_probs) - float(np.log(2.0))
    return sampler.log_probs

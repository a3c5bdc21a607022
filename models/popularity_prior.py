"""Folding the popularity prior into the served vectors.

Serving ranks by `cos(u, v) / temperature + W * log1p(count)`. Scaled by the temperature that
is `u.v + b` with `b = temperature * W * log1p(count)` in cosine units, and the bundle keeps
that an inner product of unit vectors: each item is exported as `[v, b, r] / M` and the user
tower as `PriorUserTower`'s `[u, 1, 0] / sqrt(2)` (`serving_item_matrix`,
`serving_user_tower`). The weight W and the half-life of the counts are chosen on the
validation slice from `PRIOR_GRID` x `PRIOR_HALF_LIVES` (`models.pipeline`).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from models.towers import PriorUserTower
from models.trained import TrainedModel, item_embeddings

# Candidate popularity-prior weights tried on the validation slice, and the weight used
# before that choice is made (during early stopping) or when there is no validation slice.
PRIOR_GRID = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
DEFAULT_PRIOR = 1.0
# Half-lives (days) of the popularity counted by the prior, tried with each weight: 0 counts
# every training interaction alike; shorter ones favour what is popular lately.
PRIOR_HALF_LIVES = (0.0, 90.0, 30.0, 7.0)


def item_prior(
    trained: TrainedModel, counts: np.ndarray, weight: float | None = None
) -> np.ndarray:
    """float64 `(n_items,)`: each item's popularity prior in cosine units,
    `temperature * W * log1p(count)`, W being `weight` or else `trained.prior_weight`, the
    temperature the model's own (`TwoTower.temperature`, the one its logits divide by)."""
    beta = trained.prior_weight if weight is None else weight
    return trained.model.temperature * beta * np.log1p(counts.astype(np.float64))


def serving_item_matrix(
    trained: TrainedModel, counts: np.ndarray, embeddings: np.ndarray | None = None
) -> np.ndarray:
    """The unit vectors to index: the item embeddings, or with a prior `[v, b, r] / M`.

    b is the item's prior in cosine units (`item_prior`), M the largest `|[v, b]|` and
    `r = sqrt(M^2 - 1 - b^2)` pads each vector to length M, so every vector has unit
    norm (the bundle contract) while the inner product with `PriorUserTower`'s
    `[u, 1, 0] / sqrt(2)` ranks by `u.v + b` exactly.

    Args:
        trained: the model and its prior's weight.
        counts: `(n_items,)` interactions per item known at serving time, counted with
            `trained.prior_half_life_days` (`InteractionLog.item_counts`).
        embeddings: `item_embeddings(trained)` when the caller has them already.

    Returns:
        float32 `(n_items, out_dim)`, or `(n_items, out_dim + 2)` with a prior.
    """
    items = item_embeddings(trained) if embeddings is None else embeddings
    if trained.prior_weight == 0:
        return items
    prior = item_prior(trained, counts)
    norm = np.sqrt(1.0 + prior.max(initial=0.0) ** 2)
    pad = np.sqrt(np.maximum(norm**2 - 1.0 - prior**2, 0.0))
    # Divided in float64 straight into the float32 result: no float64 copy of the table.
    folded = np.empty((len(items), items.shape[1] + 2), dtype=np.float32)
    np.divide(items, norm, out=folded[:, :-2], dtype=np.float64, casting="unsafe")
    folded[:, -2] = prior / norm
    folded[:, -1] = pad / norm
    return folded


def serving_user_tower(trained: TrainedModel) -> nn.Module:
    """The user tower as exported: the L2-normalised tower, or `PriorUserTower` over it."""
    tower = trained.model.user_tower
    return PriorUserTower(tower) if trained.prior_weight else tower

"""The item tower as the bundle ships it: raw attributes -> the exact vector the index holds.

Training's `ItemTower` gives the unit vector v; the index holds `serving_item_matrix`'s
`[v, b, r] / M` when a popularity prior is folded in (`models.popularity_prior`). To embed an
item at serving time with the same code, the exported item tower carries the last two columns
of every catalogue row (`b / M`, `r / M`) and `1 / M`, so a catalogue item reproduces its row
exactly, and a new item gets the prior of an item with no interactions (b = 0, so
`r = sqrt(M^2 - 1)`). Catalogue rows are `(B,)` int64, -1 for an id outside the catalogue,
which reads the item-id embedding's zero padding row (index 0) as training's unknown id does.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from models.features import FeatureEncoder
from models.tower_config import TowerConfig
from models.towers import PriorUserTower, TwoTower

if TYPE_CHECKING:  # the trainer's side only: the service rebuilds towers without pandas
    from models.trained import TrainedModel


class PriorItemTower(nn.Module):
    """`ItemTower` with the popularity prior folded in: `(B,)` rows + encoded attributes ->
    `(B, out_dim + 2)` unit vectors `[v / M, prior[row + 1]]`.

    Args:
        tower: the trained `ItemTower` (L2-normalised output v).
        prior_columns: float32 `(n_items + 1, 2)`: row 0 the columns of an item with no
            interactions `[0, sqrt(1 - 1/M^2)]`, row r + 1 catalogue row r's `[b, r] / M`.
        inverse_norm: 1 / M.
    """

    def __init__(self, tower: nn.Module, prior_columns: Tensor, inverse_norm: float) -> None:
        super().__init__()
        self.tower = tower
        # A frozen lookup table rather than a buffer: indexed like the item-id embedding.
        self.prior_columns = nn.Embedding.from_pretrained(prior_columns, freeze=True)
        self.inverse_norm = inverse_norm

    def forward(self, items: Tensor, features: dict[str, Tensor]) -> Tensor:
        vectors = self.tower(items, features) * self.inverse_norm
        return torch.cat([vectors, self.prior_columns(items + 1)], dim=1)


def prior_layout(item_matrix: np.ndarray, out_dim: int) -> tuple[np.ndarray, float] | None:
    """The prior columns and 1 / M of `item_matrix` (`serving_item_matrix`'s output), or None
    when it holds the item tower's vectors as they are (no prior folded in).

    1 / M is read back from the rows' first `out_dim` columns (each `v / M` with |v| = 1), so
    the tower reproduces exactly what the caller indexes whatever counts it was built from.
    """
    if item_matrix.shape[1] == out_dim:
        return None
    if item_matrix.shape[1] != out_dim + 2:
        raise ValueError(f"item matrix of width {item_matrix.shape[1]} for out_dim {out_dim}")
    inverse_norm = float(np.median(np.linalg.norm(item_matrix[:, :out_dim], axis=1)))
    columns = np.empty((len(item_matrix) + 1, 2), dtype=np.float32)
    columns[0] = (0.0, math.sqrt(max(1.0 - inverse_norm**2, 0.0)))
    columns[1:] = item_matrix[:, out_dim:]
    return columns, inverse_norm


def serving_towers(trained: TrainedModel, item_matrix: np.ndarray) -> tuple[nn.Module, nn.Module]:
    """CPU, eval-mode copies of the user and item towers as exported, over one copy of the
    shared item-id embedding: the user tower (`PriorUserTower` over it with a prior) and the
    item tower (`PriorItemTower` over it when `item_matrix` has the prior's two columns)."""
    model = copy.deepcopy(trained.model).cpu().eval()
    layout = prior_layout(item_matrix, trained.config.tower.out_dim)
    user = PriorUserTower(model.user_tower) if trained.prior_weight else model.user_tower
    if layout is None:
        return user.eval(), model.item_tower
    columns, inverse_norm = layout
    return user.eval(), PriorItemTower(model.item_tower, torch.from_numpy(columns), inverse_norm)


def rebuild_towers(
    config: TowerConfig,
    user_encoder: FeatureEncoder,
    item_encoder: FeatureEncoder,
    n_items: int,
    *,
    user_prior: bool,
    inverse_norm: float | None,
) -> tuple[nn.Module, nn.Module]:
    """The serving towers' modules as `serving_towers` builds them, for
    `load_state_dict(..., assign=True)` to fill with the exported weights (their initial
    weights are dropped then). Built on the CPU, not the meta device: a first meta tensor
    imports ~800 modules (torch._dynamo, sympy), 78 MB and 1.1 s in every serving worker,
    where initialising the tables costs 0.4 s at 1M items and is freed on assignment."""
    model = TwoTower(user_encoder, item_encoder, n_items, config).eval()
    user = PriorUserTower(model.user_tower) if user_prior else model.user_tower
    if inverse_norm is None:
        return user.eval(), model.item_tower
    columns = torch.empty(n_items + 1, 2)
    return user.eval(), PriorItemTower(model.item_tower, columns, inverse_norm).eval()

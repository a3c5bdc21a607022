"""`TowerConfig`: the architecture of both towers, recorded in the bundle manifest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

UserTowerName = Literal["fields", "sequence"]


@dataclass(frozen=True)
class TowerConfig:
    """Architecture shared by both towers.

    Args:
        field_dim: width of every field embedding (and of the item-id embedding).
        hidden: MLP hidden widths.
        out_dim: embedding dimension of the bundle.
        senet: gate fields with a squeeze-and-excitation block before the MLP.
        history_encoder: how the field tower pools the history: `mean` (masked mean
            pooling), `attention` (position-aware attention pooling), `recency` (several
            learned recency-weighted means) or `transformer` (one self-attention layer).
        dropout: dropout after each hidden layer, and in the sequential tower's blocks
            (training only).
        user_tower: `fields` (`UserTower`: every feature and the pooled history as fields of
            an MLP, trained one example per interaction) or `sequence` (`SequenceUserTower`:
            a causal transformer over the history, every position trained to predict the
            next item).
        blocks: the sequential tower's transformer blocks.
        heads: the sequential tower's attention heads (must divide `field_dim`).
    """

    field_dim: int = 32
    hidden: tuple[int, ...] = (256,)
    out_dim: int = 64
    senet: bool = False
    history_encoder: str = "mean"
    dropout: float = 0.3
    user_tower: UserTowerName = "fields"
    blocks: int = 2
    heads: int = 2

    def __post_init__(self) -> None:
        if min(self.field_dim, self.out_dim, *self.hidden) < 1:
            raise ValueError("field_dim, out_dim and every hidden width must be at least 1")
        if self.user_tower not in get_args(UserTowerName):
            raise ValueError(f"user_tower must be one of {get_args(UserTowerName)}")
        if self.blocks < 1 or self.heads < 1 or self.field_dim % self.heads:
            raise ValueError("blocks and heads must be at least 1, and heads divide field_dim")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")

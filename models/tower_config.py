"""`TowerConfig`: the architecture of both towers, recorded in the bundle manifest.

Each field's help (its `metadata`) is its documentation and the trainer CLI's help text
(`models.options`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from models.options import option

UserTowerName = Literal["fields", "sequence"]
HistoryEncoderName = Literal["mean", "attention", "recency", "transformer"]


# The field tower's `transformer` history encoder's attention heads (not an option).
TRANSFORMER_HISTORY_HEADS = 2


@dataclass(frozen=True)
class TowerConfig:
    """Architecture shared by both towers."""

    field_dim: int = option(32, "width of every field embedding (and of the item-id embedding)")
    hidden: tuple[int, ...] = option((256,), "MLP hidden widths, e.g. 256,128")
    out_dim: int = option(64, "embedding dimension of the bundle")
    senet: bool = option(False, "gate fields with a squeeze-and-excitation block before the MLP")
    history_encoder: HistoryEncoderName = option(
        "mean",
        "how the field tower pools the history: mean (masked mean), attention (position-aware "
        "attention pooling), recency (learned recency-weighted means) or transformer (one "
        "self-attention layer)",
    )
    dropout: float = option(
        0.3, "dropout after each hidden layer, and in the sequential tower's blocks"
    )
    user_tower: UserTowerName = option(
        "fields",
        "fields: every feature and the pooled history as fields of an MLP, trained one example "
        "per interaction; sequence: a causal transformer over the history, every position "
        "trained to predict the next item (its own defaults: models.train_config.PRESETS). "
        "Unless given: sequence on a next-item split (leave-last-n:N), fields otherwise",
    )
    blocks: int = option(2, "the sequential tower's transformer blocks")
    heads: int = option(2, "the sequential tower's attention heads (must divide field_dim)")

    @property
    def attention_heads(self) -> int:
        """The heads attention splits the field width among: the sequential tower's `heads`,
        the field tower's transformer history encoder's own; 1 where nothing attends so."""
        if self.user_tower == "sequence":
            return self.heads
        return TRANSFORMER_HISTORY_HEADS if self.history_encoder == "transformer" else 1

    def __post_init__(self) -> None:
        if min(self.field_dim, self.out_dim, *self.hidden) < 1:
            raise ValueError("field_dim, out_dim and every hidden width must be at least 1")
        for name, allowed in (
            ("user_tower", get_args(UserTowerName)),
            ("history_encoder", get_args(HistoryEncoderName)),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}")
        if self.blocks < 1 or self.heads < 1:
            raise ValueError("blocks and heads must be at least 1")
        if self.field_dim % self.attention_heads:
            raise ValueError(
                f"field_dim ({self.field_dim}) must be a multiple of the attention heads "
                f"({self.attention_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")

"""Two-tower model: history encoders, SENet gating, MLP towers.

Every feature becomes one `(B, D)` field vector (D = `field_dim`, `models.fields`), so the
fields can be gated by SENet and concatenated. The item-id embedding is shared: the item tower
embeds the item itself with it and the user tower reads the user's history through it (pooled
by `UserTower`, or in order by `models.sequence_tower.SequenceUserTower`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.features import HISTORY, FeatureEncoder
from models.fields import embedding_table, field_module, keyed_fields
from models.sequence_tower import SequenceUserTower
from models.tower_config import TRANSFORMER_HISTORY_HEADS, TowerConfig


class MeanHistory(nn.Module):
    """`(B, L)` item indices (0 = padding) -> `(B, D)` masked mean of item-id embeddings."""

    def __init__(self, item_embedding: nn.Embedding, length: int) -> None:
        super().__init__()
        self.item_embedding = item_embedding

    def forward(self, history: Tensor) -> Tensor:
        mask = (history > 0).unsqueeze(-1).float()
        summed = (self.item_embedding(history) * mask).sum(1)
        return summed / mask.sum(1).clamp(min=1.0)


class AttentionHistory(nn.Module):
    """`(B, L)` item indices, newest first -> `(B, D)` attention-pooled history.

    A learned query attends over item embeddings plus position (recency) embeddings, so the
    tower can weigh the latest items more and read the order; an empty history gives zeros.
    """

    def __init__(self, item_embedding: nn.Embedding, length: int) -> None:
        super().__init__()
        dim = item_embedding.embedding_dim
        self.item_embedding = item_embedding
        self.position = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        self.key = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, history: Tensor) -> Tensor:
        mask = history > 0
        values = self.item_embedding(history) + self.position[: history.shape[1]]
        logits = (self.key(values) @ self.query) * self.scale
        logits = logits.masked_fill(~mask, -1e9)
        weights = torch.softmax(logits, dim=1) * mask.float()
        return (weights.unsqueeze(-1) * values).sum(1)


class RecencyHistory(nn.Module):
    """`(B, L)` item indices, newest first -> `(B, D)` from several recency-weighted means.

    Each head pools the history with its own learned weight per position (a softmax over
    positions, masked to the items present), initialised to decay with a different half-life
    (1, 4, 16 items, and flat), so one head can follow the current session while another keeps
    the long-term taste; the heads are concatenated and projected back to D.
    """

    HALF_LIVES = (1.0, 4.0, 16.0, math.inf)

    def __init__(self, item_embedding: nn.Embedding, length: int) -> None:
        super().__init__()
        dim = item_embedding.embedding_dim
        self.item_embedding = item_embedding
        positions = torch.arange(length, dtype=torch.float32)
        decay = torch.stack([-math.log(2.0) * positions / h for h in self.HALF_LIVES])
        self.position_logits = nn.Parameter(decay)  # (heads, L)
        self.project = nn.Linear(len(self.HALF_LIVES) * dim, dim)

    def forward(self, history: Tensor) -> Tensor:
        mask = (history > 0).unsqueeze(1)  # (B, 1, L)
        logits = self.position_logits[:, : history.shape[1]].unsqueeze(0)  # (1, H, L)
        weights = torch.softmax(logits.masked_fill(~mask, -1e9), dim=-1) * mask.float()
        pooled = weights @ self.item_embedding(history)  # (B, H, D)
        return self.project(pooled.flatten(1))


class TransformerHistory(nn.Module):
    """`(B, L)` item indices, newest first -> `(B, D)`: a one-layer transformer over the
    history (item + position embeddings), read out at the newest position.

    Self-attention lets each item be read in the context of the others (order, co-occurrence)
    before the newest position summarises them; an empty history gives zeros.
    """

    def __init__(
        self, item_embedding: nn.Embedding, length: int, heads: int = TRANSFORMER_HISTORY_HEADS
    ) -> None:
        super().__init__()
        dim = item_embedding.embedding_dim
        self.item_embedding = item_embedding
        self.position = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.1, batch_first=True, norm_first=True
        )

    def forward(self, history: Tensor) -> Tensor:
        mask = history > 0
        # A row with no items would attend to nothing (NaN); let it see its padding instead.
        keep = mask | ~mask.any(dim=1, keepdim=True)
        values = self.item_embedding(history) + self.position[: history.shape[1]]
        out = self.layer(values, src_key_padding_mask=~keep)
        return out[:, 0] * mask[:, :1].float()


HISTORY_ENCODERS: dict[str, type[nn.Module]] = {
    "mean": MeanHistory,
    "attention": AttentionHistory,
    "recency": RecencyHistory,
    "transformer": TransformerHistory,
}


class SENet(nn.Module):
    """Squeeze-and-excitation over fields: `(B, F, D)` -> `(B, F, D)` reweighted per field."""

    def __init__(self, n_fields: int, reduction: int = 2) -> None:
        super().__init__()
        squeezed = max(1, n_fields // reduction)
        self.excite = nn.Sequential(
            nn.Linear(n_fields, squeezed), nn.ReLU(), nn.Linear(squeezed, n_fields), nn.Sigmoid()
        )

    def forward(self, fields: Tensor) -> Tensor:
        weights = self.excite(fields.mean(-1))
        # Scaled by 2 so a neutral gate (0.5) leaves the fields unchanged at initialisation.
        return fields * (2.0 * weights).unsqueeze(-1)


def mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class FieldTower(nn.Module):
    """Shared body of both towers: embed fields -> optional SENet -> MLP -> L2 normalise."""

    def __init__(self, fields: dict[str, nn.Module], config: TowerConfig) -> None:
        super().__init__()
        self.fields, self.inputs = keyed_fields(fields)
        n_fields = len(fields)
        self.gate = SENet(n_fields) if config.senet else nn.Identity()
        self.mlp = mlp(n_fields * config.field_dim, config.hidden, config.out_dim, config.dropout)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        embedded = [module(features[self.inputs[key]]) for key, module in self.fields.items()]
        fields = self.gate(torch.stack(embedded, dim=1))
        return F.normalize(self.mlp(fields.flatten(1)), dim=-1)


class UserTower(nn.Module):
    """Encoded user features (a dict as `FeatureEncoder.encode` returns) -> `(B, out_dim)`.

    Scripts with `torch.jit.script` on its own, as the service runs it (`models.tower_format`).
    """

    def __init__(
        self, encoder: FeatureEncoder, item_embedding: nn.Embedding, config: TowerConfig
    ) -> None:
        super().__init__()
        fields = {f.name: field_module(f, config.field_dim) for f in encoder.features}
        if encoder.history_length:
            history_cls = HISTORY_ENCODERS[config.history_encoder]
            fields[HISTORY] = history_cls(item_embedding, encoder.history_length)
        if not fields:
            raise ValueError("the user tower needs at least one feature or a history")
        self.body = FieldTower(fields, config)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.body(features)


class ItemTower(nn.Module):
    """Item indices `(B,)` (catalogue rows) + their encoded attributes -> `(B, out_dim)`."""

    def __init__(
        self, encoder: FeatureEncoder, item_embedding: nn.Embedding, config: TowerConfig
    ) -> None:
        super().__init__()
        self.item_embedding = item_embedding
        fields = {f.name: field_module(f, config.field_dim) for f in encoder.features}
        fields["item_id"] = nn.Identity()
        self.body = FieldTower(fields, config)

    def forward(self, items: Tensor, features: dict[str, Tensor]) -> Tensor:
        # Row r of the catalogue is embedding index r + 1: index 0 is history padding.
        inputs = dict(features)
        inputs["item_id"] = self.item_embedding(items + 1)
        return self.body(inputs)


class TwoTower(nn.Module):
    """User and item towers over one shared item-id embedding; scores are cosine / temperature.

    The temperature is applied here and nowhere else: every training objective turns its
    cosine scores into logits with `logits`, and the popularity prior's conversion into cosine
    units (`models.popularity_prior`) reads the same `temperature`.

    Args:
        user_encoder: fitted user-side `FeatureEncoder` (with history).
        item_encoder: fitted item-side `FeatureEncoder` (attributes only).
        n_items: catalogue size.
        config: architecture.
        temperature: softmax temperature applied to cosine similarities.
    """

    def __init__(
        self,
        user_encoder: FeatureEncoder,
        item_encoder: FeatureEncoder,
        n_items: int,
        config: TowerConfig,
        temperature: float = 0.05,
    ) -> None:
        super().__init__()
        # Sparse gradients beyond `SPARSE_ROWS` items: a step updates the rows a batch used.
        self.item_embedding = embedding_table(n_items + 1, config.field_dim, padding_idx=0)
        nn.init.normal_(self.item_embedding.weight, std=0.05)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        user_tower = SequenceUserTower if config.user_tower == "sequence" else UserTower
        self.user_tower = user_tower(user_encoder, self.item_embedding, config)
        self.item_tower = ItemTower(item_encoder, self.item_embedding, config)
        self.temperature = temperature

    def forward(
        self, user_features: dict[str, Tensor], items: Tensor, item_features: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        return self.user_tower(user_features), self.item_tower(items, item_features)

    def logits(self, cosines: Tensor) -> Tensor:
        """Cosine similarities, any shape -> the logits the softmax-style losses read."""
        return cosines / self.temperature


class PriorUserTower(nn.Module):
    """The exported user tower when a popularity prior is folded into the item vectors.

    Returns `[u, 1, 0] / sqrt(2)` for the L2-normalised user vector u: a unit vector whose
    inner product with an item's `[v, b, r] / M` (`popularity_prior.serving_item_matrix`) is
    `(u.v + b) / (M sqrt(2))`, the cosine plus the item's prior up to a scale common to all
    items. The prior is added by the search itself, which stays a plain inner-product top-K
    over unit vectors.
    """

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        user = self.tower(features)
        one = torch.ones_like(user[:, :1])
        return torch.cat([user, one, torch.zeros_like(one)], dim=1) * (0.5**0.5)

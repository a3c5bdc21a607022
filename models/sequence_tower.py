"""The sequential user tower: a causal transformer over the user's recent items (SASRec's user
side), still one tower of a two-tower model.

The item-id embedding is the item tower's own, the score an inner product with the item
tower's vectors, so the service indexes and searches exactly as for any other user tower.
Training reads every position of a user's sequence at once (`sequence`, each position
predicting the next item); serving reads the newest position only (`forward`) from the
history the service fetches, newest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.features import HISTORY, FeatureEncoder
from models.fields import field_module
from models.tower_config import TowerConfig


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where only the last `queries` positions ask (the others still
    answer as keys and values): serving wants the newest position alone from the last block.

    Shapes: `x` `(B, L, D)`; `allowed` `(B, 1, Q, L)` bool, True where query i may look at j.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, queries: int, allowed: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=-1)
        q = q[:, length - queries :]
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        return self.out(attended.transpose(1, 2).reshape(batch, queries, dim))


class CausalBlock(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a feed-forward, each residual.

    Shapes: `x` `(B, L, D)` -> `(B, Q, D)`, the outputs at its last `queries` positions.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads, dropout)
        self.feed_forward_norm = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, queries: int, allowed: Tensor) -> Tensor:
        attended = self.attention(self.attention_norm(x), queries, allowed)
        out = x[:, x.shape[1] - queries :] + self.dropout(attended)
        return out + self.dropout(self.feed_forward(self.feed_forward_norm(out)))


class SequenceUserTower(nn.Module):
    """Encoded user features + history `(B, L)` (newest first) -> `(B, out_dim)` unit vectors.

    The history is read oldest to newest in a window of `L` learned positions (the newest
    item always at the last one, as SASRec reads a left-padded window); each position attends
    to itself and the items before it. Request features (demographics, numeric, multi-hot)
    enter as one context vector added to every position's output, initialised to zero so
    training starts from the sequence alone.

    Example:
        >>> tower = SequenceUserTower(encoder, item_embedding, TowerConfig(user_tower="sequence"))
        >>> inputs = encoder.encode(rows, histories)  # histories: item ids, newest first
        >>> tower({k: torch.from_numpy(v) for k, v in inputs.items()}).shape  # (B, out_dim)
    """

    def __init__(
        self, encoder: FeatureEncoder, item_embedding: nn.Embedding, config: TowerConfig
    ) -> None:
        super().__init__()
        if not encoder.history_length:
            raise ValueError("the sequential user tower needs a history (history_length > 0)")
        dim = item_embedding.embedding_dim
        self.item_embedding = item_embedding
        self.scale = dim**0.5
        self.history = HISTORY  # an attribute: TorchScript reads no module-level constants
        self.position = nn.Parameter(torch.randn(encoder.history_length, dim) * 0.02)
        self.input_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            [CausalBlock(dim, config.heads, config.dropout) for _ in range(config.blocks)]
        )
        self.final_norm = nn.LayerNorm(dim)
        self.fields = nn.ModuleDict(
            {f.name: field_module(f, config.field_dim) for f in encoder.features}
        )
        self.context = nn.Linear(max(len(self.fields), 1) * config.field_dim, dim)
        nn.init.zeros_(self.context.weight)
        nn.init.zeros_(self.context.bias)
        self.project = nn.Linear(dim, config.out_dim)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """The user vector: the newest position's output over the newest-first history."""
        items = features[self.history].flip(1)
        # Columns that are padding for every user change nothing (positions count from the
        # newest item): a batch of short histories costs what its longest one needs.
        present = (items > 0).any(dim=0).nonzero()
        start = int(present[0, 0]) if present.shape[0] > 0 else items.shape[1] - 1
        return self.encode(features, items[:, start:], 1).squeeze(1)

    def sequence(self, features: dict[str, Tensor], items: Tensor) -> Tensor:
        """`(B, L)` item indices oldest first, left-padded with 0 -> `(B, L, out_dim)`: at
        each position, the user vector as of that item (what training predicts from)."""
        return self.encode(features, items, items.shape[1])

    def encode(self, features: dict[str, Tensor], items: Tensor, queries: int) -> Tensor:
        """Outputs `(B, queries, out_dim)` at the last `queries` positions of `items`
        (`(B, L)`, oldest first, left-padded, L at most the history length)."""
        length = items.shape[1]
        x = self.item_embedding(items) * self.scale + self.position[-length:]
        x = self.input_dropout(x) * (items > 0).unsqueeze(-1).to(x.dtype)
        allowed = self._allowed(items)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            # Only the last block narrows to the wanted positions: the others all feed it.
            wanted = queries if i == last else length
            x = block(x, wanted, allowed[:, :, length - wanted :])
        out = self.final_norm(x) + self._context(features, items.shape[0]).unsqueeze(1)
        return F.normalize(self.project(out), dim=-1)

    def _allowed(self, items: Tensor) -> Tensor:
        """`(B, 1, L, L)` bool: True where position i may attend to j: j not later than i
        and not padding. Each position may always see itself, so a padding query (whose
        output is never used) still attends to something and stays finite."""
        length = items.shape[1]
        positions = torch.arange(length, device=items.device)
        causal = positions.unsqueeze(0) <= positions.unsqueeze(1)  # (L, L): j <= i
        allowed = causal & (items > 0).unsqueeze(1)  # (B, L, L)
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=items.device)
        return allowed.unsqueeze(1)

    def _context(self, features: dict[str, Tensor], batch: int) -> Tensor:
        if len(self.fields) == 0:
            return torch.zeros(batch, self.context.out_features, device=self.position.device)
        embedded = [module(features[name]) for name, module in self.fields.items()]
        return self.context(torch.cat(embedded, dim=1))

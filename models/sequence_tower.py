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
from models.fields import field_module, keyed_fields
from models.tower_config import TowerConfig


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where every position asks, or only the positions `rows` name
    (the others still answer as keys and values): serving wants each user's newest position
    alone from the last block.

    Shapes: `x` `(B, L, D)`; `rows` `(B, Q)` positions or None for all; `allowed`
    `(B, 1, Q, L)` bool, True where query i may look at j, or None for plain causal attention
    (position i sees j <= i), which needs no mask.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rows: Tensor | None, allowed: Tensor | None) -> Tensor:
        batch, _, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=-1)
        if rows is not None:
            q = q.gather(1, rows.unsqueeze(-1).expand(-1, -1, dim))
        queries = q.shape[1]
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout, is_causal=allowed is None
        )
        return self.out(attended.transpose(1, 2).reshape(batch, queries, dim))


class CausalBlock(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a feed-forward, each residual.

    Shapes: `x` `(B, L, D)` -> `(B, Q, D)`, the outputs at positions `rows` `(B, Q)` (None:
    all L); `allowed` as `CausalSelfAttention` takes it.
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

    def forward(self, x: Tensor, rows: Tensor | None, allowed: Tensor | None) -> Tensor:
        attended = self.attention(self.attention_norm(x), rows, allowed)
        if rows is not None:
            x = x.gather(1, rows.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        out = x + self.dropout(attended)
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
        self.fields, self.inputs = keyed_fields(
            {f.name: field_module(f, config.field_dim) for f in encoder.features}
        )
        self.context = nn.Linear(max(len(self.fields), 1) * config.field_dim, dim)
        nn.init.zeros_(self.context.weight)
        nn.init.zeros_(self.context.bias)
        self.project = nn.Linear(dim, config.out_dim)

    def keep_newest(self, length: int) -> None:
        """From now on read each user's newest `length` items only: the window's last `length`
        positions, which count from the newest item as before. Training saw every history
        length from 1 up, so the shorter window reads a long history as it read a user who
        had only `length` items (`TrainConfig.serve_history_length`)."""
        if not 1 <= length <= self.position.shape[0]:
            raise ValueError(f"length must be in [1, {self.position.shape[0]}], got {length}")
        self.position = nn.Parameter(self.position.detach()[-length:].clone())

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """The user vector: the newest position's output over the newest-first history."""
        return self.newest(features, features[self.history])

    def newest(self, features: dict[str, Tensor], history: Tensor) -> Tensor:
        """`(B, L)` item indices newest first, 0-padded at the end -> `(B, out_dim)`: the
        output at each user's newest position, as `sequence` gives it at its last.

        The items are laid out oldest first from column 0 (padding after them), so plain
        causal attention keeps every item off the padding: no `(B, L, L)` mask to build or
        apply but the last block's one row. Each column's position still counts from the
        user's newest item. A batch of short histories costs what its longest one needs.
        It reads the items before the first 0 (`FeatureEncoder` writes no 0 before an item).
        """
        lengths = (history > 0).cumprod(dim=1).sum(dim=1, keepdim=True)  # (B, 1)
        width = max(int(lengths.max()), 1)
        columns = torch.arange(width, device=history.device).unsqueeze(0)  # (1, W)
        back = lengths - 1 - columns  # column j holds the item `back` places from the newest
        items = history[:, :width].gather(1, back.clamp(min=0)) * (back >= 0)
        window = self.position.shape[0]
        positions = self.position[(window - lengths + columns).clamp(max=window - 1)]
        newest = (lengths - 1).clamp(min=0)  # (B, 1): the column of the newest item
        x = self._embed(items, positions)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if i == last:  # only the newest position, over the columns up to it
                x = block(x, newest, (columns <= newest).unsqueeze(1).unsqueeze(1))
            else:
                x = block(x, None, None)
        return self._output(features, x).squeeze(1)

    def sequence(self, features: dict[str, Tensor], items: Tensor) -> Tensor:
        """`(B, L)` item indices oldest first, left-padded with 0 -> `(B, L, out_dim)`: at
        each position, the user vector as of that item (what training predicts from)."""
        x = self._embed(items, self.position[-items.shape[1] :])
        allowed = self._allowed(items)
        for block in self.blocks:
            x = block(x, None, allowed)
        return self._output(features, x)

    def _embed(self, items: Tensor, positions: Tensor) -> Tensor:
        x = self.item_embedding(items) * self.scale + positions
        return self.input_dropout(x) * (items > 0).unsqueeze(-1).to(x.dtype)

    def _output(self, features: dict[str, Tensor], x: Tensor) -> Tensor:
        out = self.final_norm(x) + self._context(features, x.shape[0]).unsqueeze(1)
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
            # Through `context` all the same (its bias, then): data-parallel training refuses
            # a parameter that takes no part in the loss.
            none = torch.zeros(batch, self.context.in_features, device=self.position.device)
            return self.context(none)
        embedded = [module(features[self.inputs[key]]) for key, module in self.fields.items()]
        return self.context(torch.cat(embedded, dim=1))

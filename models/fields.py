"""Field embedders: each feature of a tower becomes one `(B, D)` vector."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.feature_spec import Feature

# Embedding tables with more rows than this have sparse gradients, which `SparseAdam` applies
# to the rows a batch looked up (`models.optim.EmbeddingAdam`): a dense step costs the whole
# table, the 1M-item table's most of an epoch. Smaller tables stay dense, where a step over
# every row costs less than sorting the touched ones (one CPU thread, a default batch's 52k
# lookups: dense 25 vs sparse 39 ms a step at 30k rows, 69 vs 47 at 100k, 220 vs 81 at 300k).
SPARSE_ROWS = 100_000


def embedding_table(rows: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    """`nn.Embedding(rows, dim)`, with sparse gradients when it has over `SPARSE_ROWS` rows."""
    return nn.Embedding(rows, dim, padding_idx=padding_idx, sparse=rows > SPARSE_ROWS)


class CategoricalField(nn.Module):
    """`(B,)` int64 index -> `(B, D)` embedding; also used for numeric buckets.

    Row 0 (unknown or missing) starts at zero: when training never sees it (no missing
    values), an unseen value at serving time adds nothing rather than a random vector.
    """

    def __init__(self, cardinality: int, dim: int) -> None:
        super().__init__()
        self.embedding = embedding_table(cardinality, dim)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding(x)


class MultiHotField(nn.Module):
    """`(B, M)` 0-padded indices -> `(B, D)` mean of the present values' embeddings."""

    def __init__(self, cardinality: int, dim: int) -> None:
        super().__init__()
        self.embedding = embedding_table(cardinality, dim, padding_idx=0)

    def forward(self, x: Tensor) -> Tensor:
        mask = (x > 0).unsqueeze(-1).float()
        summed = (self.embedding(x) * mask).sum(1)
        return summed / mask.sum(1).clamp(min=1.0)


class DenseField(nn.Module):
    """`(B,)` standardised float -> `(B, D)` via a learned linear map."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(1, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.unsqueeze(-1))


def field_module(feature: Feature, dim: int) -> nn.Module:
    if feature.is_dense:
        return DenseField(dim)
    if feature.kind == "multi_hot":
        return MultiHotField(feature.cardinality, dim)
    return CategoricalField(feature.cardinality, dim)

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


# Names torch takes for an attribute of a tower's `nn.ModuleDict` of fields, not for a module.
_DICT_ATTRIBUTES = frozenset(dir(nn.ModuleDict()))


def module_key(name: str) -> str:
    """The key of input `name`'s module in a tower's `nn.ModuleDict` of fields (and so in its
    weights' names): the name itself, as in every bundle so far, unless torch refuses it as a
    module name (empty, holding ".", or an attribute of the dict: `type`, `items`, `float`,
    `training`...). Such a name is written "~" + the name with "~" doubled and "." as "~_",
    which no kept name can be (a name that starts with "~" is escaped too; bundles written
    before that keyed it as it was, and load renamed: `models.tower_format`)."""
    if name and "." not in name and not name.startswith("~") and name not in _DICT_ATTRIBUTES:
        return name
    return "~" + name.replace("~", "~~").replace(".", "~_")


def keyed_fields(fields: dict[str, nn.Module]) -> tuple[nn.ModuleDict, dict[str, str]]:
    """The modules of `fields` (input name -> module) as a `nn.ModuleDict` keyed by
    `module_key`, and each key's input name, for a tower's forward to read its inputs by."""
    return (
        nn.ModuleDict({module_key(name): module for name, module in fields.items()}),
        {module_key(name): name for name in fields},
    )

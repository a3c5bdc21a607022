"""The trainer's optimiser: Adam whose step costs what the batch touched."""

from __future__ import annotations

import torch


class EmbeddingAdam:
    """Adam whose step costs what the batch touched: `SparseAdam` for the embedding tables
    with sparse gradients (`models.fields.embedding_table`), `Adam` for the rest.

    A sparse table's rows move only on the steps that look them up (lazy Adam, as large
    catalogue trainers update their tables); the dense parameters are those every batch uses.
    `weight_decay` is Adam's (L2 added to the gradient): on the dense parameters every step,
    on a sparse table the rows the step touched. The full softmax (`negatives="all"`) touches
    every row each step, so there the two updates are the same.

    Args:
        model: the module to train.
        lr: learning rate of both.
        weight_decay: L2 weight, as for `torch.optim.Adam`.
    """

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float) -> None:
        tables = {
            id(m.weight): m.weight
            for m in model.modules()
            if isinstance(m, torch.nn.Embedding) and m.sparse
        }
        dense = [p for p in model.parameters() if id(p) not in tables]
        self.tables = list(tables.values())
        self.weight_decay = weight_decay
        self.optimisers: list[torch.optim.Optimizer] = []
        if dense:
            self.optimisers.append(torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay))
        if self.tables:
            self.optimisers.append(torch.optim.SparseAdam(self.tables, lr=lr))

    def zero_grad(self) -> None:
        for optimiser in self.optimisers:
            optimiser.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self) -> None:
        if self.weight_decay:
            for table in self.tables:
                if table.grad is not None:
                    grad = table.grad.coalesce()  # one value row per touched table row
                    grad.values().add_(table[grad.indices()[0]], alpha=self.weight_decay)
                    table.grad = grad
        for optimiser in self.optimisers:
            optimiser.step()

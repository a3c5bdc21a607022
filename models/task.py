"""What a training task is, and the pieces both tasks share.

A task turns a batch of example indices into a loss: `InteractionTask`
(`models.interaction_task`, the field tower: one example per interaction) and `SequenceTask`
(`models.sequence_task`, the sequential tower: one example per user). The `Trainer` only
asks a task for its number of examples, an epoch's order and a batch's loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from models.examples import InteractionLog, gather
from models.samplers import in_batch_log_q
from models.towers import TwoTower


class Task(Protocol):
    """Batches of example indices -> the loss the model trains on."""

    @property
    def n_examples(self) -> int: ...

    def epoch_order(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """The example indices of one epoch, in the order the batches take them."""
        ...

    def start_epoch(self) -> None:
        """Called before each epoch, with the model as it is then."""
        ...

    def loss(self, batch: np.ndarray) -> Tensor:
        """The scalar loss of a batch of example indices."""
        ...


@dataclass(frozen=True)
class TrainingData:
    """The encoded training data a task reads.

    Attributes:
        log: the training interactions (catalogue rows).
        user_table: encoded user attributes, by user row of `log`.
        item_table: encoded item attributes, by catalogue row.
        n_items: catalogue size.
    """

    log: InteractionLog
    user_table: dict[str, Tensor]
    item_table: dict[str, Tensor]
    n_items: int


class ItemRows:
    """The item tower over catalogue rows, their attributes held on the model's device.

    Args:
        model: the model whose item tower embeds the rows.
        data: the training data (its item table and catalogue size).
        device: where the model lives.

    Example:
        >>> ItemRows(model, data, device)(torch.tensor([0, 5])).shape  # (2, out_dim)
    """

    def __init__(self, model: TwoTower, data: TrainingData, device: torch.device) -> None:
        self.tower = model.item_tower
        self.table = {name: values.to(device) for name, values in data.item_table.items()}
        self.device = device
        self.all_rows = torch.arange(data.n_items, device=device)

    def __call__(self, rows: Tensor) -> Tensor:
        """`(N,)` catalogue rows -> `(N, out_dim)` item vectors, on the model's device."""
        rows = rows.to(self.device)
        return self.tower(rows, gather(self.table, rows))


def example_probabilities(
    log: InteractionLog, user_balance: float, half_life_days: float = 0.0
) -> np.ndarray | None:
    """`(n_events,)` probability of drawing each event as an example (`TrainConfig.user_balance`,
    `TrainConfig.recency_half_life_days`), or None when every interaction is an example once
    an epoch."""
    if not (user_balance or half_life_days):
        return None
    return log.example_probabilities(user_balance, half_life_days)


def positive_log_q(
    data: TrainingData, target_window: int, example_probs: np.ndarray | None
) -> Tensor:
    """`(n_items,)` log q of an item as an in-batch candidate: its share of the positives as
    the examples draw them (`target_window`, user balancing)."""
    draws = None if example_probs is None else example_probs * len(data.log.items)
    return in_batch_log_q(data.log.target_counts(data.n_items, target_window, draws))

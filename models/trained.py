"""The outcome of training: the model and what evaluation, validation and export read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.examples import gather
from models.features import FeatureEncoder
from models.sequence_tower import SequenceUserTower
from models.towers import TwoTower
from models.train_config import TrainConfig


@dataclass
class TrainedModel:
    """A trained model, its encoders and catalogue, and the record of its training.

    Attributes:
        model: the trained towers (eval mode).
        user_encoder: fitted user-side encoder (its `item_index` is the catalogue's).
        item_encoder: fitted item-side encoder.
        item_ids: the catalogue, row i = item_ids[i].
        item_features: encoded item attributes, by catalogue row.
        history: one record per epoch trained (`epoch`, `loss`, validation metrics).
        best_epoch: the epoch kept (the last one without validation).
        config: the run's settings.
        prior_weight: W of the popularity prior folded in at serving (`models.popularity_prior`).
        prior_half_life_days: the half-life its counts decay with (0: no decay).
    """

    model: TwoTower
    user_encoder: FeatureEncoder
    item_encoder: FeatureEncoder
    item_ids: list[str]
    item_features: dict[str, Tensor]
    history: list[dict[str, float]]
    best_epoch: int
    config: TrainConfig
    prior_weight: float
    prior_half_life_days: float = 0.0


def read_newest(trained: TrainedModel, length: int) -> TrainedModel:
    """`trained` with its sequential user tower cut, in place, to read each user's newest
    `length` items (0 or its own length: unchanged): what `serve_history_length` serves, and
    so what validation after training, evaluation and export see."""
    encoder = trained.user_encoder
    if not length or length == encoder.history_length:
        return trained
    tower = trained.model.user_tower
    if not isinstance(tower, SequenceUserTower):
        raise ValueError("only the sequential user tower can read fewer items than it trained on")
    tower.keep_newest(length)
    shorter = FeatureEncoder(encoder.features, length, encoder.item_index)
    return dataclasses.replace(trained, user_encoder=shorter)


@torch.no_grad()
def item_embeddings(trained: TrainedModel, batch_size: int = 8192) -> np.ndarray:
    """float32 `(n_items, out_dim)`, L2-normalised, row i = `trained.item_ids[i]`."""
    trained.model.eval()
    device = next(trained.model.parameters()).device
    n_items = len(trained.item_ids)
    # Filled batch by batch: one table in memory, not the batches and their concatenation.
    out = np.empty((n_items, trained.config.tower.out_dim), dtype=np.float32)
    for start in range(0, n_items, batch_size):
        rows = torch.arange(start, min(start + batch_size, n_items))
        feats = {k: v.to(device) for k, v in gather(trained.item_features, rows).items()}
        out[start : start + len(rows)] = trained.model.item_tower(rows.to(device), feats).cpu()
    return out

"""Shared pieces of the trainer tests: tiny synthetic data and fast training settings."""

import dataclasses
import json
from typing import Any

import torch
from redis import Redis

from models.dataset import Dataset
from models.interaction_task import InteractionTask
from models.sources import load_dataset
from models.towers import TowerConfig
from models.train import Trainer
from models.train_config import TrainConfig

# The models here are tiny: extra intra-op threads only add synchronisation, and on a busy
# 2-core machine they made training ten times slower. Applies to the whole test process.
torch.set_num_threads(1)

SMALL_SOURCE = "synthetic:seed=1,users=300,items=200"


def small_dataset(source: str = SMALL_SOURCE) -> Dataset:
    return load_dataset(source)


def fast_config(**overrides: Any) -> TrainConfig:
    """A configuration that trains the small dataset in well under a second per epoch."""
    base = TrainConfig(
        epochs=2,
        batch_size=256,
        history_length=20,
        tower=TowerConfig(field_dim=16, hidden=(64,), out_dim=32),
        patience=0,
        validation_fraction=0.0,  # no validation slice unless a test asks for one
        seed=0,
        device="auto",
    )
    return dataclasses.replace(base, **overrides)


def interaction_task(trainer: Trainer) -> InteractionTask:
    """The field tower's task of `trainer`, for tests that look inside it."""
    assert isinstance(trainer.task, InteractionTask)
    return trainer.task


def stored_json(client: Redis, key: str) -> Any:
    value = client.get(key)
    assert isinstance(value, str), f"no string at {key}"
    return json.loads(value)


def stored_list(client: Redis, key: str) -> list[str]:
    values = client.lrange(key, 0, -1)
    assert isinstance(values, list)
    return [str(v) for v in values]

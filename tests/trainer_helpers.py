"""Shared pieces of the trainer tests: tiny synthetic data and fast training settings."""

import dataclasses
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from models.dataset import Dataset
from models.sources import load_dataset
from models.towers import TowerConfig
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


REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@contextmanager
def redis_namespace() -> Iterator[tuple[Redis, str]]:
    """A real Redis client and a key prefix of the caller's alone; its keys are deleted after."""
    client = Redis.from_url(REDIS_URL, socket_timeout=5, decode_responses=True)
    try:
        client.ping()
    except RedisConnectionError:
        client.close()
        pytest.skip(f"no Redis reachable at {REDIS_URL} (set TEST_REDIS_URL)")
    prefix = f"test-{uuid.uuid4().hex}"
    try:
        yield client, prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


def stored_json(client: Redis, key: str) -> Any:
    value = client.get(key)
    assert isinstance(value, str), f"no string at {key}"
    return json.loads(value)


def stored_list(client: Redis, key: str) -> list[str]:
    values = client.lrange(key, 0, -1)
    assert isinstance(values, list)
    return [str(v) for v in values]

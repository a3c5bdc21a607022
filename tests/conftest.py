"""Shared fixtures: a real Redis, a real Redis Cluster, and real bundles made by the real
trainer (session scope)."""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import torch
from helpers_app import RedisServer
from helpers_cluster import LocalCluster, delete_prefix
from helpers_process import Processes

from models.bundle import write_latest
from models.dataset import Dataset
from models.pipeline import run_training
from models.sources import load_dataset
from models.train_config import TrainConfig

# Two small synthetic worlds; the second gives a different version for reload tests.
SOURCE_V1 = "synthetic:seed=1,users=300,items=200"
SOURCE_V2 = "synthetic:seed=2,users=300,items=200"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def _reachable(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """TEST_REDIS_URL, else the local Redis (database 15), else a redis-server of our own."""
    url = os.environ.get("TEST_REDIS_URL") or "redis://127.0.0.1:6379/15"
    if _reachable(url):
        yield url
        return
    if shutil.which("redis-server") is None:
        pytest.fail(f"no Redis at {url} and no redis-server binary to start one")
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """TEST_REDIS_CLUSTER_URL (scripts/test.sh starts one), else a cluster of our own for the
    session (3 primaries + 3 replicas). Shared: tests that kill nodes use `private_cluster`."""
    url = os.environ.get("TEST_REDIS_CLUSTER_URL")
    if url:
        yield url
        return
    if shutil.which("redis-server") is None:
        pytest.fail("no TEST_REDIS_CLUSTER_URL and no redis-server binary to start a cluster")
    cluster = LocalCluster().start()
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
def cluster_prefix(redis_cluster_url: str) -> Iterator[str]:
    """A key prefix of this test's own on the shared cluster; its keys are deleted afterwards."""
    prefix = f"test:{uuid.uuid4().hex}"
    yield prefix
    delete_prefix(redis_cluster_url, prefix)


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"test:{uuid.uuid4().hex}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@dataclass(frozen=True)
class Bundles:
    """Two bundles trained by the real trainer: `v1` on SOURCE_V1, `v2` on SOURCE_V2."""

    v1: Path
    v2: Path
    dataset_v1: Dataset


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    # Tiny models: extra intra-op threads only add synchronisation (10x slower on 2 busy
    # cores); the service runs with one thread per worker too (TORCH_THREADS).
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    config = TrainConfig(epochs=2, validation_fraction=0.0, batch_size=256)
    dataset_v1 = load_dataset(SOURCE_V1)
    with warnings.catch_warnings():
        # torch 2.13 deprecates torch.jit, and TorchScript is the bundle format (docs/design.md).
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        v1 = run_training(dataset_v1, "none", config, root).bundle
        v2 = run_training(load_dataset(SOURCE_V2), "none", config, root).bundle
    assert v1 is not None and v2 is not None and v1.name != v2.name
    return Bundles(v1, v2, dataset_v1)


@pytest.fixture
def model_dir(tmp_path: Path, bundles: Bundles) -> Path:
    """A MODEL_DIR of this test's own holding both versions, LATEST naming v1."""
    root = tmp_path / "artifacts"
    root.mkdir()
    for source in (bundles.v1, bundles.v2):
        shutil.copytree(source, root / source.name)
    write_latest(root, bundles.v1.name)
    return root


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Real processes a test starts (`helpers_process`), all stopped when it ends."""
    group = Processes(tmp_path / "logs")
    yield group
    group.stop_all()

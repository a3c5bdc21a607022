"""The processes one scenario runs, always stopped when it ends (also when it fails): a
redis-server (`harness.procs.RedisServer`: it can be frozen, killed and restarted on its
port), and service replicas
(`python -m app`) sharing a MODEL_DIR that holds two good versions."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import redis

from harness import procs
from harness.bundles import Recipe, ensure_bundle
from models import online_store
from models.sources import load_dataset

ADMIN_TOKEN = "fault-suite-token"
# Trains in a minute or two on two cores (cached after); 20,000 items make each loaded
# version weigh several MB, so a reload that leaked one would show in the soak's memory.
RECIPE = Recipe(
    items=20_000,
    users=2_000,
    epochs=1,
    batch_size=512,
    field_dim=16,
    hidden="64",
    out_dim=32,
    history_length=20,
)


@dataclass(frozen=True)
class Versions:
    """A MODEL_DIR holding two good versions; LATEST names `v1`, trained on `source`."""

    model_dir: Path
    v1: str
    v2: str
    source: str


def train_two_versions(cache_dir: Path, log: TextIO = sys.stderr) -> tuple[Path, Path]:
    """Two bundles by the real trainer (`python -m models train --split none`) on the
    synthetic source with seeds 1 and 2, cached by recipe under `cache_dir`."""
    found = []
    for seed in (1, 2):
        recipe = dataclasses.replace(RECIPE, seed=seed)
        built = ensure_bundle(recipe, cache_dir, log)
        found.append(built.model_dir / built.version)
    return found[0], found[1]


def model_dir_with(target: Path, v1: Path, v2: Path, source: str) -> Versions:
    target.mkdir(parents=True)
    for bundle in (v1, v2):
        shutil.copytree(bundle, target / bundle.name)
    (target / "LATEST").write_text(v1.name + "\n")
    return Versions(target, v1.name, v2.name, source)


def publish(redis_url: str, source: str, history_length: int = 20) -> int:
    """Every user of `source` into Redis, in the service's key layout: what
    `python -m models publish-features` does, in this process (no second interpreter)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return online_store.publish(client, load_dataset(source), history_length=history_length)
    finally:
        client.close()


class Stack(contextlib.ExitStack):
    """Starts what a scenario needs and stops all of it on exit, in reverse order."""

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)

    def redis(self) -> procs.RedisServer:
        server = procs.RedisServer()
        self.callback(server.stop)
        server.start()
        return server

    def services(
        self,
        model_dir: Path,
        redis_url: str,
        workers: Sequence[int],
        env: dict[str, Any] | None = None,
        timeout_s: float = 120,
    ) -> list[procs.Service]:
        """One replica per entry of `workers` (its worker count), started side by side and
        ready on every worker before this returns."""
        extra = {"ADMIN_TOKEN": ADMIN_TOKEN} | {k: str(v) for k, v in (env or {}).items()}
        replicas = []
        for n, count in enumerate(workers):
            log = self.workdir / f"service-{n}.log"
            service = procs.Service(model_dir, redis_url, "flat", count, log, extra_env=extra)
            self.callback(service.stop)
            replicas.append(service.start())
        for service in replicas:
            service.wait_ready(timeout_s)
        return replicas

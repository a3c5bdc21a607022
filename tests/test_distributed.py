"""Data-parallel training: real processes in a real (gloo) process group, as torchrun runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers_app import free_port
from trainer_helpers import SMALL_SOURCE

from models import bundle as b
from models.distributed import World, end_process, join_world, leave_world
from models.sources import load_dataset


def _member(rank: int, port: int, out: Path) -> None:
    """One process of a world of two: what each of World's operations gave it."""
    os.environ |= {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": "2",
    }
    world = join_world(torch.device("cpu"))
    order = np.random.default_rng(rank).permutation(11)  # each process draws its own
    seen = {
        "world": [world.rank, world.size],
        "order": order.tolist(),
        "shard": world.shard(order).tolist(),
        "from_main": world.from_main(lambda: f"made by rank {rank}"),
        "sum": world.sum([rank + 1.0, 10.0]),
    }
    torch.manual_seed(0)
    world.check_in_sync(torch.nn.Linear(4, 4))  # the same parameters everywhere: passes
    torch.manual_seed(rank)
    try:
        world.check_in_sync(torch.nn.Linear(4, 4))
        seen["diverged"] = "not detected"
    except RuntimeError as exc:
        seen["diverged"] = str(exc)
    assert leave_world()
    (out / f"{rank}.json").write_text(json.dumps(seen))
    end_process(0)  # as the command line ends a member (models.distributed.end_process)


@pytest.mark.slow
def test_a_world_of_two_shares_rank_zeros_order_and_results(tmp_path: Path) -> None:
    mp.spawn(_member, args=(free_port(), tmp_path), nprocs=2, join=True)
    first, second = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert (first["world"], second["world"]) == ([0, 2], [1, 2])
    # Both shards come from rank 0's order, never overlap and are the same size (DDP steps
    # in lockstep); the odd example out is left for the next epoch's shuffle.
    order = first["order"]
    assert first["shard"] == order[0::2][:5] and second["shard"] == order[1::2][:5]
    assert not set(first["shard"]) & set(second["shard"])
    assert first["from_main"] == second["from_main"] == "made by rank 0"
    assert first["sum"] == second["sum"] == [3.0, 20.0]
    assert "different models" in first["diverged"] and "different models" in second["diverged"]


def test_a_world_of_one_never_communicates() -> None:
    world = World()
    order = np.arange(7)
    assert world.is_main and world.shard(order) is order
    assert world.from_main(lambda: 5) == 5 and world.sum([1.5]) == [1.5]
    world.check_in_sync(torch.nn.Linear(2, 2))
    # CUDA means the process's own GPU once there are several processes (never moved here).
    assert world.place(torch.device("cuda")) == torch.device("cuda")
    second = World(rank=1, size=2, local_rank=1)
    assert second.place(torch.device("cuda")) == torch.device("cuda", 1)
    assert second.place(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.slow
def test_torchrun_trains_one_model_that_rank_zero_exports(tmp_path: Path) -> None:
    out = tmp_path / "artifacts"
    done = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", "2", "-m", "models", "-v", "train", "--data", SMALL_SOURCE,
            "--out", str(out),
            "--epochs", "3", "--patience", "1", "--batch-size", "256", "--history-length", "20",
            "--field-dim", "16", "--hidden", "64", "--out-dim", "32", "--baselines",
        ],
        capture_output=True, text=True, timeout=300, check=False,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # Each process checks at the end of training that all hold the same parameters (DDP
    # averaged the gradients); rank 0 alone evaluates, exports and prints the bundle.
    versions = b.list_versions(out)
    assert done.stdout.split() == [str(out / versions[0])] and len(versions) == 1
    assert b.read_latest(out) == versions[0]
    manifest = json.loads((out / versions[0] / "manifest.json").read_text())
    # Early stopping and the refit ran (validation by default), and the model learned.
    assert manifest["training"]["validation"] is not None
    # Each process trained on its half of every epoch: the refit's epochs cover the whole
    # training period, shared evenly.
    shares = {
        rank: [int(n) for n in re.findall(rf"rank {rank} trains on (\d+) examples", done.stderr)]
        for rank in (0, 1)
    }
    assert shares[0] == shares[1] and len(shares[0]) > 1
    assert max(shares[0]) == manifest["data"]["n_train_interactions"] // 2
    results = manifest["evaluation"]["results"]
    assert results["two_tower"]["recall@50"] > results["most_popular"]["recall@50"]


@pytest.mark.slow
def test_torchrun_trains_the_sequential_tower_on_interactions_alone(tmp_path: Path) -> None:
    """No user attributes: the sequential tower's context layer still takes part in the loss
    (DDP failed at the second step: "parameters that did not receive grad")."""
    data = tmp_path / "data"
    data.mkdir()
    interactions = load_dataset(SMALL_SOURCE).interactions
    interactions.to_csv(data / "i.csv", index=False)
    (data / "schema.json").write_text(json.dumps({"interactions": {"file": "i.csv"}}))
    done = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", "2", "-m", "models", "train", "--data", f"csv:{data}",
            "--split", "leave-last-n:1", "--user-tower", "sequence", "--out", str(tmp_path / "a"),
            "--epochs", "2", "--batch-size", "32", "--history-length", "10", "--out-dim", "16",
        ],
        capture_output=True, text=True, timeout=300, check=False,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(b.list_versions(tmp_path / "a")) == 1

"""Data-parallel training with PyTorch's own `DistributedDataParallel`, launched by `torchrun`.

    torchrun --nproc-per-node 4 -m models train --data ml-1m:DIR --out artifacts

Every process builds the same model (DDP copies rank 0's parameters to the others), trains on
its own share of each epoch's examples, and DDP averages the gradients in `backward`, so the
processes step in lockstep and hold the same model throughout. Rank 0 validates (its record
is broadcast, so every rank stops at the same epoch), evaluates and exports; the others only
train. `--batch-size` is per process, and so are the in-batch negatives. Each process uses the
GPU of its `LOCAL_RANK` when CUDA is on. Without `torchrun` (`WORLD_SIZE` unset or 1) nothing
here communicates and training is the single-process loop.
"""

from __future__ import annotations

import faulthandler
import hashlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")

# How long a process waits in a collective for the others: rank 0 alone validates, and after
# training it alone searches the prior (21 rankings of the validation users) while the others
# wait to refit.
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """Where this process trains: with several processes, CUDA means its own GPU."""
        if self.size > 1 and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, order: np.ndarray) -> np.ndarray:
        """This process's share of an epoch's example order (rank 0's order): every process
        gets as many examples, since DDP steps in lockstep and a process with an extra batch
        would wait for the others forever."""
        if self.size == 1:
            return order
        shared = torch.from_numpy(np.ascontiguousarray(order, dtype=np.int64))
        dist.broadcast(shared, src=0)
        return shared.numpy()[self.rank :: self.size][: len(order) // self.size]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the processes (e.g. loss totals and step counts)."""
        if self.size == 1:
            return values
        summed = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(summed)
        return summed.tolist()

    def from_main(self, make: Callable[[], T]) -> T:
        """`make()` run on rank 0 only, its result sent to every process."""
        if self.size == 1:
            return make()
        box: list[Any] = [make() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_in_sync(self, model: nn.Module) -> None:
        """Raise unless every process ended with the same parameters (the point of DDP)."""
        if self.size == 1:
            return
        digest = hashlib.sha256()
        for tensor in model.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digests: list[Any] = [None] * self.size
        dist.all_gather_object(digests, digest.hexdigest())
        if len(set(digests)) > 1:
            raise RuntimeError(f"data-parallel processes ended with different models: {digests}")


def join_world(device: torch.device) -> World:
    """The process group `torchrun` describes (joined once per process), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        # A member killed by a signal prints every thread's Python stack first (how the
        # abort at exit that `end_process` avoids was first placed).
        faulthandler.enable(all_threads=True)
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        # NCCL carries the GPUs' gradients; gloo the CPU tensors (the epoch's order, sums).
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


class BatchLoss(nn.Module):
    """A batch's training loss as a module's forward: DDP synchronises the gradients of the
    parameters used inside the forward of the module it wraps, here the whole `model`.

    Args:
        model: the module whose parameters the loss trains.
        loss: example indices `(B,)` -> scalar loss, computed with `model`.
    """

    def __init__(self, model: nn.Module, loss: Callable[[np.ndarray], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: np.ndarray) -> Tensor:
        return self.loss(batch)


def data_parallel(module: BatchLoss, world: World) -> nn.Module:
    """`module`, wrapped by DDP when there is more than one process."""
    if world.size == 1:
        return module
    device = next(module.parameters()).device
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )


def leave_world() -> bool:
    """Leave the process group, if this process joined one (torch warns at exit otherwise):
    whether it had."""
    if not dist.is_initialized():
        return False
    dist.destroy_process_group()
    return True


def end_process(code: int) -> NoReturn:
    """End a training process that was one of several now, with `code`, its output flushed,
    without the interpreter's finalisation.

    A member sometimes died at exit with SIGABRT ("terminate called without an active
    exception"). Caught under gdb (torchrun, 2 processes, 1 run in 16 on a loaded 2-core box):
    a gloo worker thread (`pt_gloo_runloop`) was still destroying the last collective's work
    (`AsyncAllgatherWork`, whose tensors Python had let go) when the main thread entered
    `Py_FinalizeEx`; the thread asked for the GIL to release them, and a thread that does so
    while Python finalises is ended on the spot, inside a destructor that may not unwind. Under
    torchrun these threads outlive `destroy_process_group` (a bare two-process group's do not;
    why is not known), so there is no point after which finalising is safe: skip it.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

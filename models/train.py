"""The training loop: a task's loss over epochs, early stopping on validation, reproducible.

What a batch's loss is belongs to the task (`models.task`): `InteractionTask` for the field
tower, `SequenceTask` for the sequential one. The `Trainer` builds the model and the task,
runs the epochs (data-parallel under `torchrun`, `models.distributed`), validates after each
and keeps the best.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable
from functools import partial

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from models.dataset import Dataset
from models.distributed import BatchLoss, data_parallel, join_world
from models.examples import InteractionLog, encode_table, fit_encoders
from models.fields import SPARSE_ROWS
from models.interaction_task import InteractionTask
from models.optim import EmbeddingAdam
from models.popularity_prior import DEFAULT_PRIOR
from models.sequence_task import SequenceTask
from models.task import Task, TrainingData
from models.towers import TwoTower
from models.train_config import TrainConfig
from models.trained import TrainedModel, read_newest

log = logging.getLogger(__name__)

ValidateFn = Callable[[TrainedModel], dict[str, float]]


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_task(
    model: TwoTower,
    data: TrainingData,
    config: TrainConfig,
    generator: torch.Generator,
    rng: np.random.Generator,
    device: torch.device,
) -> Task:
    """The objective the user tower trains with: whole sequences for the sequential tower
    (one example per user), one example per interaction for the field tower."""
    if config.tower.user_tower == "sequence":
        return SequenceTask(model, data, config, generator, device)
    return InteractionTask(model, data, config, generator, rng, device)


class Trainer:
    """Trains a `TwoTower` on one interaction log; see `TrainConfig` for the options.

    Args:
        dataset: source of the attribute tables and the catalogue.
        train: training interactions (the caller's split; no test data).
        config: the run's settings.
        validate: called after each epoch with the model, returns validation metrics; the
            best epoch by `config.validation_metric` is kept. None trains all epochs.
    """

    def __init__(
        self,
        dataset: Dataset,
        train: pd.DataFrame,
        config: TrainConfig,
        validate: ValidateFn | None = None,
    ) -> None:
        self.config = config
        self.validate = validate
        self.generator = seed_everything(config.seed)
        device = config.resolved_device()
        self.world = join_world(device)
        self.device = self.world.place(device)
        rank = self.world.rank
        # Other processes draw other dropout masks, targets and negatives (torch's global
        # seed moves only once the model is built: every process builds the same one).
        self.rng = np.random.default_rng((config.seed, rank) if rank else config.seed)
        if rank:
            self.generator.manual_seed(config.seed + rank)
        self.item_ids = [str(i) for i in dataset.items.index]
        self.user_encoder, self.item_encoder = fit_encoders(dataset, train, config.history_length)
        self.log = InteractionLog.build(train, self.user_encoder.item_index)
        self.item_table = encode_table(self.item_encoder, dataset.items, self.item_ids)
        data = TrainingData(
            self.log,
            encode_table(self.user_encoder, dataset.users, self.log.user_ids),
            self.item_table,
            len(self.item_ids),
        )
        self.model = TwoTower(
            self.user_encoder, self.item_encoder, data.n_items, config.tower, config.temperature
        ).to(self.device)
        self.task = make_task(self.model, data, config, self.generator, self.rng, self.device)
        # With torchrun, DDP wraps the loss; it starts every process from rank 0's parameters.
        self.step = data_parallel(BatchLoss(self.model, self.task.loss), self.world)
        if rank:
            torch.manual_seed(config.seed + rank)

    def _optimiser(self) -> EmbeddingAdam:
        optimiser = EmbeddingAdam(self.model, self.config.lr, self.config.weight_decay)
        if optimiser.tables and self.world.size > 1 and self.device.type == "cuda":
            raise ValueError(
                "data-parallel training on GPUs (NCCL) cannot all-reduce sparse gradients, "
                f"which embedding tables over {SPARSE_ROWS} rows have (here "
                f"{len(self.item_ids)} items or an attribute): train on one GPU, or in CPU "
                "processes (gloo)"
            )
        return optimiser

    def _check_examples(self) -> None:
        if len(self.log.items) == 0:
            raise ValueError("no training interactions with a known item")
        n = self.task.n_examples
        if n == 0:  # only the sequential task's: its examples are users with 2+ items
            raise ValueError("no training user with two interactions or more")
        if n < self.world.size:
            raise ValueError(f"{n} training interactions for {self.world.size} processes")

    def fit(self) -> TrainedModel:
        cfg, world, validate = self.config, self.world, self.validate
        optimiser = self._optimiser()
        self._check_examples()
        history: list[dict[str, float]] = []
        best_state, best_score, best_epoch, stale = None, -np.inf, cfg.epochs, 0
        for epoch in range(1, cfg.epochs + 1):
            record = {"epoch": float(epoch), "loss": self._train_epoch(epoch, optimiser)}
            if not math.isfinite(record["loss"]):  # it would only fail the export's checks
                raise ValueError(
                    f"training diverged in epoch {epoch} (mean loss {record['loss']}): "
                    "try a lower --lr"
                )
            if validate is not None:
                record |= world.from_main(partial(validate, self.result(history, epoch)))
            history.append(record)
            if world.is_main:
                log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in record.items()})
            if validate is None:
                continue
            score = record[cfg.validation_metric]
            if score > best_score:
                best_score, best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(self.model.state_dict())
            else:
                stale += 1
                if cfg.patience and stale >= cfg.patience:
                    break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        world.check_in_sync(self.model)
        # Trained on history_length items, kept reading what it will serve from here on.
        return read_newest(self.result(history, best_epoch), cfg.serve_history_length)

    def _train_epoch(self, epoch: int, optimiser: EmbeddingAdam) -> float:
        """One pass over this process's share of the task's examples; the mean batch loss
        over every process."""
        cfg, world = self.config, self.world
        self.model.train()
        self.task.start_epoch()
        order = world.shard(self.task.epoch_order(self.rng, cfg.batch_size))
        if world.size > 1:
            log.info("epoch %d: rank %d trains on %d examples", epoch, world.rank, len(order))
        # Summed where the loss is: reading it back each step would wait for a GPU.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        steps = range(0, len(order), cfg.batch_size)
        quiet = None if world.is_main else True  # one progress bar, not one per process
        dtype = cfg.autocast_dtype(self.device)
        for start in tqdm(steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=quiet):
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                loss = self.step(order[start : start + cfg.batch_size])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.detach()
        summed, count = world.sum([float(total), len(steps)])
        return summed / count

    def result(self, history: list[dict[str, float]], best_epoch: int) -> TrainedModel:
        self.model.eval()
        prior = self.config.popularity_prior
        return TrainedModel(
            model=self.model,
            user_encoder=self.user_encoder,
            item_encoder=self.item_encoder,
            item_ids=self.item_ids,
            item_features=self.item_table,
            history=history,
            best_epoch=best_epoch,
            config=self.config,
            prior_weight=DEFAULT_PRIOR if prior is None else prior,
            prior_half_life_days=self.config.prior_half_life_days or 0.0,
        )

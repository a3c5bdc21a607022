"""Training loop: objectives x negatives, early stopping on a validation slice, reproducible."""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from models.dataset import Dataset
from models.distill import DistillationLoss, TeacherTargets, ease_targets
from models.distributed import BatchLoss, data_parallel, join_world
from models.examples import InteractionLog, encode_table, fit_encoders, gather
from models.features import HISTORY, FeatureEncoder
from models.fields import SPARSE_ROWS
from models.losses import (
    BinaryCrossEntropyLoss,
    PairwiseLogisticLoss,
    SampledSoftmaxLoss,
    TripletHingeLoss,
)
from models.samplers import NegativeSampler, in_batch_log_q, popularity_sampler, uniform_sampler
from models.sequence_task import SequenceTask
from models.towers import PriorUserTower, TwoTower
from models.train_config import NegativesName, TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """The outcome of training: the model and what the service and evaluation need."""

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

    @torch.no_grad()
    def item_embeddings(self, batch_size: int = 8192) -> np.ndarray:
        """float32 `(n_items, out_dim)`, L2-normalised, row i = item_ids[i]."""
        self.model.eval()
        device = next(self.model.parameters()).device
        # Filled batch by batch: one table in memory, not the batches and their concatenation.
        out = np.empty((len(self.item_ids), self.config.tower.out_dim), dtype=np.float32)
        for start in range(0, len(self.item_ids), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(self.item_ids)))
            feats = {k: v.to(device) for k, v in gather(self.item_features, rows).items()}
            out[start : start + len(rows)] = self.model.item_tower(rows.to(device), feats).cpu()
        return out

    def prior(self, counts: np.ndarray, weight: float | None = None) -> np.ndarray:
        """float64 `(n_items,)`: each item's popularity prior in cosine units,
        `temperature * W * log1p(count)`, W being `weight` or else `prior_weight`."""
        beta = self.prior_weight if weight is None else weight
        return self.config.temperature * beta * np.log1p(counts.astype(np.float64))

    def serving_item_matrix(
        self, counts: np.ndarray, embeddings: np.ndarray | None = None
    ) -> np.ndarray:
        """The unit vectors to index: the item embeddings, or with a prior `[v, b, r] / M`.

        b is the item's prior in cosine units (`prior`), M the largest `|[v, b]|` and
        `r = sqrt(M^2 - 1 - b^2)` pads each vector to length M, so every vector has unit
        norm (the bundle contract) while the inner product with `PriorUserTower`'s
        `[u, 1, 0] / sqrt(2)` ranks by `u.v + b` exactly.

        Args:
            counts: `(n_items,)` interactions per item known at serving time, counted with
                `prior_half_life_days` (`InteractionLog.item_counts`).
            embeddings: `item_embeddings()` when the caller has them already.
        """
        items = self.item_embeddings() if embeddings is None else embeddings
        if self.prior_weight == 0:
            return items
        prior = self.prior(counts)
        norm = np.sqrt(1.0 + prior.max(initial=0.0) ** 2)
        pad = np.sqrt(np.maximum(norm**2 - 1.0 - prior**2, 0.0))
        # Divided in float64 straight into the float32 result: no float64 copy of the table.
        folded = np.empty((len(items), items.shape[1] + 2), dtype=np.float32)
        np.divide(items, norm, out=folded[:, :-2], dtype=np.float64, casting="unsafe")
        folded[:, -2] = prior / norm
        folded[:, -1] = pad / norm
        return folded

    def serving_user_tower(self) -> torch.nn.Module:
        """The user tower as exported: the L2-normalised tower, or `PriorUserTower` over it."""
        tower = self.model.user_tower
        return PriorUserTower(tower) if self.prior_weight else tower


# Candidate popularity-prior weights tried on the validation slice, and the weight used
# before that choice is made (during early stopping) or when there is no validation slice.
PRIOR_GRID = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
DEFAULT_PRIOR = 1.0
# Half-lives (days) of the popularity counted by the prior, tried with each weight: 0 counts
# every training interaction alike; shorter ones favour what is popular lately.
PRIOR_HALF_LIVES = (0.0, 90.0, 30.0, 7.0)

ValidateFn = Callable[[TrainedModel], dict[str, float]]


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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


def _sampler(
    name: NegativesName, counts: np.ndarray, generator: torch.Generator
) -> NegativeSampler | None:
    if name == "uniform":
        return uniform_sampler(len(counts), generator)
    if name in ("popularity", "mixed"):
        return popularity_sampler(counts, generator)
    return None


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
        self.rng = np.random.default_rng(config.seed)
        device = config.resolved_device()
        self.world = join_world(device)
        self.device = self.world.place(device)
        self.item_ids = [str(i) for i in dataset.items.index]
        self.user_encoder, self.item_encoder = fit_encoders(dataset, train, config.history_length)
        self.log = InteractionLog.build(train, self.user_encoder.item_index)
        self.user_table = encode_table(self.user_encoder, dataset.users, self.log.user_ids)
        self.item_table = encode_table(self.item_encoder, dataset.items, self.item_ids)
        counts = self.log.item_counts(len(self.item_ids))
        self.example_probs = None
        draws = None  # times each event is drawn as an example per epoch (expected)
        if config.user_balance:
            self.example_probs = self.log.example_probabilities(config.user_balance)
            draws = self.example_probs * len(self.log.items)
        positive_counts = self.log.target_counts(len(self.item_ids), config.target_window, draws)
        self.in_batch_logq = in_batch_log_q(positive_counts).to(self.device)
        # Sorted user x item keys of the log, for masking the users' own items as negatives.
        self.user_items = np.unique(self.log.users * len(self.item_ids) + self.log.items)
        self.sampler = _sampler(config.negatives, counts, self.generator)
        self.model = TwoTower(
            self.user_encoder,
            self.item_encoder,
            len(self.item_ids),
            config.tower,
            config.temperature,
        ).to(self.device)
        # The sequential tower trains on whole sequences: one example is one user.
        self.sequence_task = None
        if config.tower.user_tower == "sequence":
            self.sequence_task = SequenceTask(
                self.model,
                self.log,
                self.user_table,
                self.item_table,
                config,
                self.sampler,
                self.in_batch_logq,
                self.device,
            )
        self.listwise = SampledSoftmaxLoss(config.temperature, config.logq_correction)
        self.per_example = {
            "bce": BinaryCrossEntropyLoss(config.temperature),
            "hinge": TripletHingeLoss(),
            "logistic": PairwiseLogisticLoss(config.temperature),
        }.get(config.loss)
        self.teacher: TeacherTargets | None = None
        if config.distill_weight > 0:
            self.teacher = ease_targets(
                self.log, len(self.item_ids), config.distill_top_k, config.distill_temperature
            )
        self.distillation = DistillationLoss()
        # With torchrun, DDP wraps the loss; it starts every process from rank 0's parameters.
        self.step = data_parallel(BatchLoss(self.model, self.loss), self.world)
        if self.world.rank:  # other processes draw other dropout masks and negatives
            self.rng = np.random.default_rng((config.seed, self.world.rank))
            self.generator.manual_seed(config.seed + self.world.rank)
            torch.manual_seed(config.seed + self.world.rank)

    def _items(self, rows: Tensor) -> Tensor:
        feats = {k: v.to(self.device) for k, v in gather(self.item_table, rows).items()}
        return self.model.item_tower(rows.to(self.device), feats)

    def _user_features(self, batch: np.ndarray, targets: np.ndarray) -> dict[str, Tensor]:
        """The user tower's inputs for a batch of examples whose positives are `targets`."""
        log_, length = self.log, self.config.history_length
        feats = gather(self.user_table, torch.from_numpy(log_.users[batch]))
        if length:
            starts = log_.user_start[batch]
            if self.config.history_mode == "latest":
                ends = log_.user_end[log_.users[batch]]
                hist = log_.histories(ends, starts, length, skip=targets)
            else:
                hist = log_.histories(log_.history_end[batch], starts, length)
            if self.config.history_dropout > 0:
                hist = np.where(self.rng.random(hist.shape) < self.config.history_dropout, 0, hist)
                # Close the gaps, newest first, as serving encodes a shorter history (encoders
                # that read positions, like the transformer's newest slot, see no holes).
                hist = np.take_along_axis(hist, np.argsort(hist == 0, axis=1, kind="stable"), 1)
            feats[HISTORY] = torch.from_numpy(hist)
        return {k: v.to(self.device) for k, v in feats.items()}

    def _targets(self, batch: np.ndarray) -> np.ndarray:
        """Event indices whose items are the batch's positives (`InteractionLog.draw_targets`:
        with a `target_window` W > 1 the user vector learns to retrieve what the user does
        over a horizon, not only next)."""
        return self.log.draw_targets(batch, self.config.target_window, self.rng)

    def _negative_rows(self, n: int, positives: Tensor) -> tuple[Tensor, Tensor]:
        """`n` negative rows and log q for the per-example losses and softmax extras."""
        neg = self.config.negatives
        if neg == "in-batch" or (neg == "mixed" and self.per_example is not None):
            picks = torch.randint(len(positives), (n,), generator=self.generator)
            rows = positives[picks]
            inb = rows, self.in_batch_logq[rows.to(self.device)].cpu()
            if neg == "in-batch":
                return inb
            assert self.sampler is not None
            half = self.sampler.sample(n - n // 2)
            return torch.cat([inb[0][: n // 2], half[0]]), torch.cat([inb[1][: n // 2], half[1]])
        assert self.sampler is not None
        return self.sampler.sample(n)

    def _seen(self, batch: np.ndarray, candidates: Tensor) -> Tensor | None:
        """`(B, C)` bool: candidate rows each example's user has in the training log."""
        if not self.config.mask_seen_negatives:
            return None
        keys = self.log.users[batch][:, None] * len(self.item_ids) + candidates.numpy()[None, :]
        found = np.searchsorted(self.user_items, keys).clip(max=len(self.user_items) - 1)
        return torch.from_numpy(self.user_items[found] == keys).to(self.device)

    def loss(self, batch: np.ndarray) -> Tensor:
        """Loss of one batch of examples: indices into the interaction log, or into the
        sequence task's users."""
        if self.sequence_task is not None:
            return self.sequence_task.loss(batch)
        targets = self._targets(batch)
        users = self.model.user_tower(self._user_features(batch, targets))
        loss = self._objective(batch, targets, users)
        if self.teacher is None:
            return loss
        return loss + self.config.distill_weight * self._distill(batch, users)

    def _distill(self, batch: np.ndarray, users: Tensor) -> Tensor:
        """The distillation term: the student's catalogue softmax vs the teacher's targets."""
        assert self.teacher is not None
        logits = users @ self._items(torch.arange(len(self.item_ids))).T / self.config.temperature
        seen = self.teacher.seen_mask(self.log.users[batch]).to(self.device)
        logits = logits.masked_fill(seen, torch.finfo(logits.dtype).min)
        rows = torch.from_numpy(self.log.users[batch])
        return self.distillation(
            logits,
            self.teacher.items[rows].to(self.device),
            self.teacher.probs[rows].to(self.device),
        )

    def _objective(self, batch: np.ndarray, targets: np.ndarray, users: Tensor) -> Tensor:
        """The configured loss of one batch whose user vectors are `users` `(B, D)`."""
        pos_rows = torch.from_numpy(self.log.items[targets])
        positives = self._items(pos_rows)
        pos_ids = pos_rows.to(self.device)
        k = self.config.num_negatives
        if self.config.negatives == "all":
            everything = torch.arange(len(self.item_ids))
            logits = users @ self._items(everything).T / self.config.temperature
            seen = self._seen(batch, everything)
            if seen is not None:
                seen[torch.arange(len(batch)), pos_rows] = False
                logits = logits.masked_fill(seen, torch.finfo(logits.dtype).min)
            return F.cross_entropy(logits, pos_ids)
        if self.per_example is None:
            if self.config.negatives == "in-batch":
                seen = self._seen(batch, pos_rows)
                return self.listwise(
                    users, positives, pos_ids, self.in_batch_logq[pos_ids], seen=seen
                )
            rows, logq = self._negative_rows(self.config.softmax_negatives, pos_rows)
            return self.listwise(
                users,
                positives,
                pos_ids,
                self.in_batch_logq[pos_ids],
                self._items(rows),
                rows.to(self.device),
                logq.to(self.device),
                seen=self._seen(batch, torch.cat([pos_rows, rows])),
            )
        k = max(k, 1)
        rows, _ = self._negative_rows(len(batch) * k, pos_rows)
        negatives = self._items(rows).view(len(batch), k, -1)
        valid = (rows.view(len(batch), k) != pos_rows.unsqueeze(1)).to(self.device)
        return self.per_example(users, positives, negatives, valid)

    def fit(self) -> TrainedModel:
        cfg = self.config
        optimiser = EmbeddingAdam(self.model, cfg.lr, cfg.weight_decay)
        if optimiser.tables and self.world.size > 1 and self.device.type == "cuda":
            raise ValueError(
                "data-parallel training on GPUs (NCCL) cannot all-reduce sparse gradients, "
                f"which embedding tables over {SPARSE_ROWS} rows have (here "
                f"{len(self.item_ids)} items or an attribute): train on one GPU, or in CPU "
                "processes (gloo)"
            )
        n = len(self.log.items)
        if n == 0:
            raise ValueError("no training interactions with a known item")
        if self.sequence_task is not None:
            n = self.sequence_task.n_examples
            if n == 0:
                raise ValueError("no training user with two interactions or more")
        rng, world, validate = self.rng, self.world, self.validate
        if n < world.size:
            raise ValueError(f"{n} training interactions for {world.size} processes")
        history: list[dict[str, float]] = []
        best_state, best_score, best_epoch, stale = None, -np.inf, cfg.epochs, 0
        for epoch in range(1, cfg.epochs + 1):
            self.model.train()
            if self.sequence_task is not None:
                self.sequence_task.start_epoch()
            if self.sequence_task is not None:
                order = self.sequence_task.epoch_order(rng, cfg.batch_size)
            elif self.example_probs is None:
                order = rng.permutation(n)
            else:
                order = rng.choice(n, size=n, p=self.example_probs)
            order = world.shard(order)
            if world.size > 1:
                log.info("epoch %d: rank %d trains on %d examples", epoch, world.rank, len(order))
            total = 0.0
            steps = range(0, len(order), cfg.batch_size)
            quiet = None if world.is_main else True  # one progress bar, not one per process
            bar = tqdm(steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=quiet)
            for start in bar:
                loss = self.step(order[start : start + cfg.batch_size])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += loss.item()
            total, count = world.sum([total, len(steps)])
            record = {"epoch": float(epoch), "loss": total / count}
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
        return self.result(history, best_epoch)

    def result(self, history: list[dict[str, float]], best_epoch: int) -> TrainedModel:
        self.model.eval()
        return TrainedModel(
            self.model,
            self.user_encoder,
            self.item_encoder,
            self.item_ids,
            self.item_table,
            history,
            best_epoch,
            self.config,
            DEFAULT_PRIOR if self.config.popularity_prior is None else self.config.popularity_prior,
            self.config.prior_half_life_days or 0.0,
        )

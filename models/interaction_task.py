"""The field tower's objective: every interaction is one example.

An example is one event of the training log: the user's attributes and history as of it
(`history_mode`), and a positive drawn from the user's next `target_window` events. The user
vector is scored against the positive and against negatives, in one of three ways chosen once
from the config:

- the full softmax over the whole catalogue (`negatives="all"`): exact, no sampling bias;
- the sampled softmax (`loss="softmax"`): the batch's own positives, plus shared sampled
  negatives unless `in-batch`, with logQ correction and accidental hits masked;
- a per-example loss (`bce`, `hinge`, `logistic`): each positive against its own
  `num_negatives` negatives.

With `distill_weight` > 0 an EASE teacher's soft targets over the catalogue are added
(`models.distill`). Scores become logits through the model (`TwoTower.logits`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.distill import DistillationLoss, TeacherTargets, ease_targets
from models.examples import as_tensor, gather, history_rows
from models.features import HISTORY
from models.losses import (
    BinaryCrossEntropyLoss,
    Logits,
    PairwiseLogisticLoss,
    SampledSoftmaxLoss,
    TripletHingeLoss,
)
from models.samplers import negative_sampler
from models.task import ItemRows, TrainingData, example_probabilities, positive_log_q
from models.towers import TwoTower
from models.train_config import LossName, TrainConfig

# The scores of one batch whose user vectors are `(B, D)`: (examples, targets, users) -> loss;
# the examples and their target events are indices into the log, on the model's device.
Objective = Callable[[Tensor, Tensor, Tensor], Tensor]


def per_example_loss(loss: LossName, logits: Logits) -> nn.Module | None:
    """The loss of each positive against its own negatives (None: the softmax, listwise)."""
    if loss == "bce":
        return BinaryCrossEntropyLoss(logits)
    if loss == "hinge":
        return TripletHingeLoss()
    if loss == "logistic":
        return PairwiseLogisticLoss(logits)
    return None


class InteractionTask:
    """Batches of interactions -> the configured loss of the field tower.

    Args:
        model: a `TwoTower` with the field user tower.
        data: the encoded training data.
        config: the run's settings (loss, negatives, history, distillation...).
        generator: torch generator of the negatives' draws.
        rng: numpy generator of the targets' draws and the history dropout.
        device: where the model lives.
    """

    def __init__(
        self,
        model: TwoTower,
        data: TrainingData,
        config: TrainConfig,
        generator: torch.Generator,
        rng: np.random.Generator,
        device: torch.device,
    ) -> None:
        self.model, self.log, self.config, self.device = model, data.log, config, device
        self.n_items = data.n_items
        self.generator, self.rng = generator, rng
        # The log and the users' attributes, held where the model is: a batch's features and
        # histories are gathered there, with no per-batch assembly on the CPU and copy to a
        # GPU. History dropout draws there too, from a generator seeded by the run's.
        log = data.log
        self.events = {
            name: as_tensor(values).to(device)
            for name, values in (("items", log.items), ("users", log.users),
                                 ("user_start", log.user_start),
                                 ("history_end", log.history_end), ("user_end", log.user_end))
        }  # fmt: skip
        self.user_table = {k: v.to(device) for k, v in data.user_table.items()}
        self.dropout_generator = torch.Generator(device).manual_seed(int(rng.integers(2**62)))
        self.items = ItemRows(model, data, device)
        self.example_probs = example_probabilities(
            self.log, config.user_balance, config.recency_half_life_days
        )
        logq = positive_log_q(data, config.target_window, self.example_probs)
        self.in_batch_logq = logq.to(device)
        # Sorted user x item keys of the log, for masking the users' own items as negatives.
        self.user_items = np.unique(self.log.users * self.n_items + self.log.items)
        counts = self.log.item_counts(self.n_items)
        self.sampler = negative_sampler(config.negatives, counts, generator)
        self.softmax = SampledSoftmaxLoss(model.logits, config.logq_correction)
        self.per_example = per_example_loss(config.loss, model.logits)
        self.objective = self._choose_objective()
        self.teacher: TeacherTargets | None = None
        if config.distill_weight > 0:
            self.teacher = ease_targets(
                self.log, self.n_items, config.distill_top_k, config.distill_temperature
            )
        self.distillation = DistillationLoss()

    def _choose_objective(self) -> Objective:
        """How a batch is scored, chosen once from the config."""
        if self.config.negatives == "all":
            return self._full_softmax
        if self.per_example is None:
            return self._sampled_softmax
        return self._per_example

    @property
    def n_examples(self) -> int:
        return len(self.log.items)

    def epoch_order(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """Every interaction once in random order, or (`user_balance`, a recency half-life)
        as many draws with replacement, each event with its probability."""
        n = self.n_examples
        if self.example_probs is None:
            return rng.permutation(n)
        return rng.choice(n, size=n, p=self.example_probs)

    def start_epoch(self) -> None:
        """Nothing to refresh: the negatives are drawn batch by batch."""

    def loss(self, batch: np.ndarray) -> Tensor:
        """The loss of a batch of event indices into the log, distillation included."""
        drawn = self.targets(batch)
        examples = torch.from_numpy(batch).to(self.device)
        # Next-item targets are the batch itself (`draw_targets` returns it): no second copy.
        targets = examples if drawn is batch else torch.from_numpy(drawn).to(self.device)
        users = self.model.user_tower(self.user_features(examples, targets))
        loss = self.objective(examples, targets, users)
        if self.teacher is None:
            return loss
        return loss + self.config.distill_weight * self._distill(examples, users)

    def targets(self, batch: np.ndarray) -> np.ndarray:
        """Event indices whose items are the batch's positives (`InteractionLog.draw_targets`:
        with a `target_window` W > 1 the user vector learns to retrieve what the user does
        over a horizon, not only next)."""
        return self.log.draw_targets(batch, self.config.target_window, self.rng)

    def user_features(self, examples: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """The user tower's inputs for `examples` whose positives are the events `targets`
        (both indices into the log, on the model's device)."""
        events, length = self.events, self.config.history_length
        users = events["users"][examples]
        feats = gather(self.user_table, users)
        if length:
            items, starts = events["items"], events["user_start"][examples]
            if self.config.history_mode == "latest":
                ends = events["user_end"][users]
                hist = history_rows(items, ends, starts, length, skip=targets)
            else:
                hist = history_rows(items, events["history_end"][examples], starts, length)
            if self.config.history_dropout > 0:
                draws = torch.rand(hist.shape, generator=self.dropout_generator, device=hist.device)
                hist = hist.masked_fill(draws < self.config.history_dropout, 0)
                # Close the gaps, newest first, as serving encodes a shorter history (encoders
                # that read positions, like the transformer's newest slot, see no holes).
                order = torch.argsort((hist == 0).to(torch.uint8), dim=1, stable=True)
                hist = hist.gather(1, order)
            feats[HISTORY] = hist
        return feats

    def seen(self, examples: Tensor, candidates: Tensor) -> Tensor | None:
        """`(B, C)` bool: candidate rows each example's user has in the training log (None
        unless `mask_seen_negatives`; looked up on the CPU)."""
        if not self.config.mask_seen_negatives:
            return None
        users = self.log.users[examples.cpu().numpy()]
        keys = users[:, None] * self.n_items + candidates.cpu().numpy()[None, :]
        found = np.searchsorted(self.user_items, keys).clip(max=len(self.user_items) - 1)
        return torch.from_numpy(self.user_items[found] == keys).to(self.device)

    def _full_softmax(self, examples: Tensor, targets: Tensor, users: Tensor) -> Tensor:
        """Cross-entropy over the whole catalogue, the users' other own items masked out if
        `mask_seen_negatives`."""
        pos_rows = self.events["items"][targets]
        everything = self.items.all_rows
        logits = self.model.logits(users @ self.items(everything).T)
        seen = self.seen(examples, everything)
        if seen is not None:
            seen[torch.arange(len(examples), device=seen.device), pos_rows] = False
            logits = logits.masked_fill(seen, torch.finfo(logits.dtype).min)
        return F.cross_entropy(logits, pos_rows)

    def _sampled_softmax(self, examples: Tensor, targets: Tensor, users: Tensor) -> Tensor:
        """The batch's positives as one another's negatives, plus the shared sampled ones."""
        pos_rows = self.events["items"][targets]
        positives = self.items(pos_rows)
        pos_logq = self.in_batch_logq[pos_rows]
        if self.config.negatives == "in-batch":
            seen = self.seen(examples, pos_rows)
            return self.softmax(users, positives, pos_rows, pos_logq, seen=seen)
        rows, logq = self._negative_rows(self.config.softmax_negatives, pos_rows)
        return self.softmax(
            users,
            positives,
            pos_rows,
            pos_logq,
            self.items(rows),
            rows,
            logq,
            seen=self.seen(examples, torch.cat([pos_rows, rows])),
        )

    def _per_example(self, examples: Tensor, targets: Tensor, users: Tensor) -> Tensor:
        """Each positive against its own `num_negatives` (at least 1) negatives."""
        assert self.per_example is not None
        pos_rows = self.events["items"][targets]
        positives = self.items(pos_rows)
        k = max(self.config.num_negatives, 1)
        rows, _ = self._negative_rows(len(examples) * k, pos_rows)
        negatives = self.items(rows).view(len(examples), k, -1)
        valid = rows.view(len(examples), k) != pos_rows.unsqueeze(1)
        return self.per_example(users, positives, negatives, valid)

    def _negative_rows(self, n: int, positives: Tensor) -> tuple[Tensor, Tensor]:
        """`n` negative rows and their log q, on the model's device: the batch's positives
        drawn again (`in-batch`), the sampler's, or (`mixed`, per-example losses) half of
        each. (The draws come from the run's CPU generator: a few thousand indices a step.)"""
        neg = self.config.negatives
        if neg == "in-batch" or (neg == "mixed" and self.per_example is not None):
            picks = torch.randint(len(positives), (n,), generator=self.generator)
            rows = positives[picks.to(self.device)]
            if neg == "in-batch":
                return rows, self.in_batch_logq[rows]
            assert self.sampler is not None
            sampled, sampled_logq = self.sampler.sample(n - n // 2)
            kept = rows[: n // 2]
            return (
                torch.cat([kept, sampled.to(self.device)]),
                torch.cat([self.in_batch_logq[kept], sampled_logq.to(self.device)]),
            )
        assert self.sampler is not None
        rows, logq = self.sampler.sample(n)
        return rows.to(self.device), logq.to(self.device)

    def _distill(self, examples: Tensor, users: Tensor) -> Tensor:
        """The distillation term: the student's catalogue softmax vs the teacher's targets
        (held on the CPU, gathered per batch)."""
        assert self.teacher is not None
        batch = examples.cpu().numpy()
        logits = self.model.logits(users @ self.items(self.items.all_rows).T)
        seen = self.teacher.seen_mask(self.log.users[batch]).to(self.device)
        logits = logits.masked_fill(seen, torch.finfo(logits.dtype).min)
        rows = torch.from_numpy(self.log.users[batch])
        return self.distillation(
            logits,
            self.teacher.items[rows].to(self.device),
            self.teacher.probs[rows].to(self.device),
        )

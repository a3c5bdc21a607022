"""`TrainConfig`: every training option in one place, documented, with its default."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from models.towers import TowerConfig

LossName = Literal["softmax", "bce", "hinge", "logistic"]
NegativesName = Literal["in-batch", "uniform", "popularity", "mixed", "all"]
HistoryMode = Literal["before", "latest"]

# Shared sampled negatives per batch of the softmax when `num_negatives` is 0.
DEFAULT_SOFTMAX_NEGATIVES = 1024


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (recorded in the bundle manifest).

    Args:
        loss: `softmax` (listwise sampled softmax, the default), `bce` (pointwise, 1:k),
            `hinge` (pairwise triplet hinge) or `logistic` (pairwise BPR).
        negatives: `in-batch` (the other examples' positives), `uniform`, `popularity`
            (count^0.75), `mixed` (in-batch plus popularity-sampled) or `all` (softmax only:
            the full softmax over the whole catalogue, exact and without sampling bias, for
            catalogues small enough to run the item tower over every item each step). For
            `softmax`, the batch's positives are always candidates and `num_negatives` sampled
            items are added (none with `in-batch`); for the other losses each example gets
            `num_negatives`. The sequential tower (`tower.user_tower="sequence"`) scores every
            position against the whole catalogue with `all`, and otherwise against
            `num_negatives` shared candidates drawn from the batch's targets (`in-batch`), the
            sampler, or half of each (`mixed`).
        num_negatives: sampled negatives; 0 means `DEFAULT_SOFTMAX_NEGATIVES` shared by the
            batch for the softmax with `uniform`, `popularity` or `mixed` negatives (never a
            silent in-batch-only run), and 1 per example for the other losses.
        logq_correction: softmax only.
        temperature: cosine scores are divided by it.
        history_length: items of recent behaviour the user tower reads.
        popularity_prior: weight of log(1 + training count) added to the scaled score at
            retrieval time (`score = cos / temperature + prior * log1p(count)`); folded into
            the exported vectors, so search stays an inner product. 0 disables it; None (the
            default) picks it from `PRIOR_GRID` on the validation slice after training,
            together with `prior_half_life_days` from `PRIOR_HALF_LIVES` when that is None.
        prior_half_life_days: the prior's counts decay with this half-life, measured back
            from the end of the training log (0: every interaction counts alike).
        target_window: positives are drawn from the user's next `target_window` events
            (1 = next-item prediction); the history stays strictly before the example.
        history_mode: what the user tower reads for an example: `before` (the items strictly
            before it: sequential next-item training) or `latest` (the user's latest items as
            of the end of the training log, the positive removed: exactly the input the model
            gets at serving time, so it learns to complete a user's set of items from it).
        history_dropout: share of history items hidden at random in each training example
            (an augmentation: the tower cannot memorise a user's exact history).
        hard_negatives: per user, the items the current model ranks highest that the user did
            not take (mined again at the start of every epoch), added as negatives to each of
            that user's positions; the sequential tower with sampled negatives only (the full
            softmax already holds every item). 0 disables it.
        mask_seen_negatives: softmax only: a candidate the user interacted with anywhere in
            the training log is not used as that user's negative (it is a false negative:
            retrieval is asked to find such items, not to rank them low).
        distill_weight: weight of a distillation term (`models.distill`): the student's
            softmax over the whole catalogue is also trained towards an EASE teacher fitted
            on the same training log (0 disables it; small catalogues only).
        distill_temperature: the teacher's softmax temperature (on per-user standardised
            scores): lower concentrates the targets on the teacher's very best items.
        distill_top_k: teacher items kept as soft targets per user.
        user_balance: each epoch draws as many examples as there are interactions, with
            probability proportional to (the user's interaction count) ** -user_balance:
            0 (every interaction once, in random order: heavy users dominate), 1 (every user
            alike, with replacement). logQ follows the positives' resulting frequencies.
        patience: epochs without validation improvement before stopping (0 = never stop
            early: every epoch runs, and the best on validation is kept).
        refit: after early stopping (and the prior's choice), train again from scratch on the
            whole training period, validation slice included, for the best epoch count.
        validation_fraction: share of the training period's end used for early stopping and
            the prior's choice. 0: no validation: every epoch trains on the whole training
            period and the last is kept, the prior is `popularity_prior` (or its default), no
            refit.
        validation_metric: what early stopping and the prior's search maximise: a key of the
            validator's metrics (`recall@10`, `recall@50`, `ndcg@10`, `ndcg@50`, ...) or
            `pooled_recall@50` (total hits / total relevant: heavy users weigh more).
        validation_min_gap_days: the validation slice keeps only returning users, whose first
            interaction in it comes at least this many days after their last earlier one
            (`models.splits.validation_split`); 0 keeps every user.
    """

    epochs: int = 20
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.0
    loss: LossName = "softmax"
    negatives: NegativesName = "in-batch"
    num_negatives: int = 0
    logq_correction: bool = True
    temperature: float = 0.05
    history_length: int = 100
    popularity_prior: float | None = None
    prior_half_life_days: float | None = None
    target_window: int = 1
    history_mode: HistoryMode = "latest"
    history_dropout: float = 0.3
    mask_seen_negatives: bool = False
    refit: bool = True
    distill_weight: float = 0.0
    distill_temperature: float = 2.0
    distill_top_k: int = 100
    user_balance: float = 0.0
    hard_negatives: int = 0
    tower: TowerConfig = field(default_factory=TowerConfig)
    patience: int = 2
    validation_fraction: float = 0.1
    validation_min_gap_days: float = 14.0
    validation_metric: str = "pooled_recall@50"
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        # Checked here, before any data is read: a bad value must not cost a training run.
        for name in ("epochs", "batch_size", "target_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        not_negative = ("weight_decay", "num_negatives", "hard_negatives", "history_length",
                        "patience", "user_balance", "validation_min_gap_days")  # fmt: skip
        optional = ("popularity_prior", "prior_half_life_days")  # None: chosen on validation
        for name in (*not_negative, *optional):
            value = getattr(self, name)
            if value is not None and not value >= 0:  # `not >=`: NaN fails too
                raise ValueError(f"{name} must be >= 0")
        if not (self.lr > 0 and self.temperature > 0):
            raise ValueError("lr and temperature must be > 0")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError("validation_fraction must be in [0, 1)")
        if not 0.0 <= self.history_dropout < 1.0:
            raise ValueError("history_dropout must be in [0, 1)")
        if self.negatives == "all" and self.loss != "softmax":
            raise ValueError("negatives 'all' (the full softmax) needs loss 'softmax'")
        if self.mask_seen_negatives and self.loss != "softmax":
            raise ValueError("mask_seen_negatives applies to loss 'softmax' only")
        if self.distill_weight < 0 or self.distill_temperature <= 0 or self.distill_top_k < 1:
            raise ValueError("distillation needs weight >= 0, temperature > 0 and top_k >= 1")
        if self.tower.user_tower == "sequence":
            if self.loss != "softmax" or self.distill_weight or self.mask_seen_negatives:
                raise ValueError(
                    "the sequential user tower trains with loss 'softmax', without distillation "
                    "or mask_seen_negatives"
                )
            if self.history_length < 1:
                raise ValueError("the sequential user tower needs history_length >= 1")
        if self.hard_negatives and (self.tower.user_tower != "sequence" or self.negatives == "all"):
            raise ValueError(
                "hard_negatives applies to the sequential user tower with sampled negatives "
                "(the full softmax, negatives 'all', already scores every item)"
            )
        self.resolved_device()  # a device this machine does not have

    @property
    def softmax_negatives(self) -> int:
        """Sampled negatives the softmax adds to a batch (with a sampled `negatives` kind)."""
        return self.num_negatives or DEFAULT_SOFTMAX_NEGATIVES

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"device {self.device!r}: {exc}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available here")
        return device

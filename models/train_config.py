"""`TrainConfig`: every training option in one place, documented, with its default.

Each field's help (its `metadata`) is its documentation and the trainer CLI's help text
(`models.options`). `PRESETS` holds the defaults that differ by user tower: the sequential
tower trains as SASRec-family models do, and `TrainConfig.create` starts from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

import torch

from models.options import option
from models.splits import is_next_item
from models.towers import TowerConfig

LossName = Literal["softmax", "bce", "hinge", "logistic"]
NegativesName = Literal["in-batch", "uniform", "popularity", "mixed", "all"]
HistoryMode = Literal["before", "latest"]
ValidationMetric = Literal["recall@50", "pooled_recall@50", "recall@10", "ndcg@10", "ndcg@50"]
Precision = Literal["auto", "fp32", "bf16"]

# Shared sampled negatives per batch of the softmax when `num_negatives` is 0.
DEFAULT_SOFTMAX_NEGATIVES = 1024


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (recorded in the bundle manifest)."""

    epochs: int = option(20, "passes over the training data (at most: see patience)")
    batch_size: int = option(512, "examples a step (the sequential tower: users a step)")
    lr: float = option(2e-3, "Adam's learning rate")
    weight_decay: float = option(0.0, "Adam's L2 weight")
    loss: LossName = option(
        "softmax",
        "softmax (listwise sampled softmax), bce (pointwise, 1:k), hinge (pairwise triplet "
        "hinge on cosines) or logistic (pairwise BPR)",
    )
    negatives: NegativesName = option(
        "in-batch",
        "in-batch (the other examples' positives), uniform, popularity (count^0.75), mixed "
        "(in-batch plus popularity-sampled) or all (softmax only: the full softmax over the "
        "whole catalogue, exact, for catalogues small enough to score every item each step). "
        "The softmax always has the batch's positives as candidates and adds num_negatives "
        "sampled items (none with in-batch; so mixed samples as popularity does there); the "
        "other losses give each example "
        "num_negatives. The sequential tower scores every position against the whole "
        "catalogue with all, otherwise against num_negatives shared candidates drawn from the "
        "batch's targets (in-batch), the sampler, or half of each (mixed)",
    )
    num_negatives: int = option(
        0,
        f"sampled negatives; 0: {DEFAULT_SOFTMAX_NEGATIVES} shared by a batch for the softmax "
        "with uniform, popularity or mixed negatives (never a silent in-batch-only run), 1 per "
        "example for the other losses",
    )
    logq_correction: bool = option(
        True, "softmax: subtract each candidate's log sampling probability", flag="logq"
    )
    temperature: float = option(0.05, "cosine scores are divided by it")
    history_length: int = option(100, "items of recent behaviour the user tower reads")
    serve_history_length: int = option(
        0,
        "sequential tower: the newest items the trained (evaluated, exported, served) tower "
        "reads, fewer than history_length for a cheaper encode; 0: history_length",
    )
    popularity_prior: float | None = option(
        None,
        "weight of log(1 + training count) added to the scaled score at retrieval (score = "
        "cos / temperature + prior * log1p(count)), folded into the exported vectors so search "
        "stays an inner product; 0: off; unset: chosen on the validation slice after training, "
        "with the half-life when that is unset too",
    )
    prior_half_life_days: float | None = option(
        None,
        "days: the prior's counts decay with this half-life back from the end of the training "
        "log (0: every interaction alike; unset: chosen with the prior's weight)",
        flag="prior-half-life",
    )
    target_window: int = option(
        1, "positives are drawn from the user's next N events (1: next-item prediction)"
    )
    history_mode: HistoryMode = option(
        "latest",
        "before: the items strictly before each example (next-item training); latest: the "
        "user's latest items at the end of the training log minus the positive (exactly what "
        "serving reads)",
    )
    history_dropout: float = option(
        0.3, "share of history items hidden at random in each training example"
    )
    mask_seen_negatives: bool = option(
        False, "softmax: never use an item the user interacted with as their negative"
    )
    refit: bool = option(
        True,
        "after early stopping (and the prior's choice), train again from scratch on the whole "
        "training period, validation slice included, for the best epoch count",
    )
    distill_weight: float = option(
        0.0,
        "weight of distillation from an EASE teacher fitted on the training log (0: off; "
        "small catalogues: the student scores the whole catalogue every step)",
    )
    distill_temperature: float = option(
        2.0, "softmax temperature of the teacher's per-user standardised scores"
    )
    distill_top_k: int = option(100, "teacher items kept as soft targets per user")
    user_balance: float = option(
        0.0,
        "draw each epoch's examples with probability ~ (user's interaction count)^-B: 0 every "
        "interaction once (heavy users dominate), 1 every user alike (logQ follows)",
    )
    recency_half_life_days: float = option(
        0.0,
        "days, field tower: draw each epoch's examples with weight 0.5^(age / this), age from "
        "the training log's last interaction, so recent tastes weigh more (0: off; combines "
        "with user_balance; logQ follows)",
        flag="recency-half-life",
    )
    hard_negatives: int = option(
        0,
        "sequential tower with sampled negatives: per user, the K items the model ranks "
        "highest that the user did not take, mined again every epoch (0: off)",
    )
    length_window: int = option(
        0,
        "sequential tower: group each epoch's users by history length within windows of this "
        "many batches, so that batches pad less (faster epochs), each batch's loss weighed by "
        "its positions; 0: a plain shuffle (better on the ML-1M validation)",
    )
    tower: TowerConfig = field(default_factory=TowerConfig)
    patience: int = option(2, "epochs without validation improvement before stopping (0: never)")
    validation_fraction: float = option(
        0.1,
        "share of the training period's end held out for early stopping and the prior's "
        "choice (next-item splits, leave-last-n:N: each training user's last N items, "
        "whatever the share); 0: no validation, no early stopping, no prior search, no refit",
    )
    validation_min_gap_days: float = option(
        14.0,
        "days: validate only on returning users, whose first validation interaction comes at "
        "least this long after their last earlier one (0: every user)",
        flag="validation-min-gap",
    )
    validation_metric: ValidationMetric = option(
        "pooled_recall@50",
        "what early stopping and the prior's search maximise on the validation slice (recall: "
        "mean over users; pooled: total hits / total relevant items)",
    )
    seed: int = option(0, "seeds every random draw of the run")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda:0, ...")
    precision: Precision = option(
        "auto",
        "training arithmetic: bf16 (mixed precision: each step's forward and loss under "
        "torch.autocast to bfloat16; weights, gradients and the optimiser stay float32), fp32, "
        "or auto: bf16 on a CUDA device that has it, fp32 on a CPU (where bf16 pays only with "
        "bfloat16 units: 1.13x faster epochs with AVX-512 BF16, slower without)",
    )

    @classmethod
    def create(cls, split: str | None = None, **given: Any) -> TrainConfig:
        """A config from `{dotted field path: value}` (`tower.field_dim`...) over the
        defaults of the user tower asked for (`PRESETS`); with none asked for, that of the
        protocol of `split` (`default_user_tower`)."""
        user_tower = given.get("tower.user_tower", default_user_tower(split))
        given = given | {"tower.user_tower": user_tower}
        values = PRESETS[user_tower] | given
        if "serve_history_length" in values and "serve_history_length" not in given:
            # The preset's served read cuts the window: never longer than a shorter one given.
            values["serve_history_length"] = min(
                values["serve_history_length"], values["history_length"]
            )
        tower = {k.removeprefix("tower."): v for k, v in values.items() if k.startswith("tower.")}
        rest = {k: v for k, v in values.items() if not k.startswith("tower.")}
        return cls(**rest, tower=TowerConfig(**tower))

    def __post_init__(self) -> None:
        # Checked here, before any data is read: a bad value must not cost a training run.
        for f in fields(self):  # inf passes every bound below and trains nothing (or NaN)
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        for name, allowed in (
            ("loss", get_args(LossName)),
            ("negatives", get_args(NegativesName)),
            ("history_mode", get_args(HistoryMode)),
            ("validation_metric", get_args(ValidationMetric)),
            ("precision", get_args(Precision)),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}")
        for name in ("epochs", "batch_size", "target_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        not_negative = ("weight_decay", "num_negatives", "hard_negatives", "history_length",
                        "serve_history_length", "patience", "user_balance",
                        "validation_min_gap_days", "length_window",
                        "recency_half_life_days")  # fmt: skip
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
        if self.distill_weight < 0 or self.distill_temperature <= 0 or self.distill_top_k < 1:
            raise ValueError("distillation needs weight >= 0, temperature > 0 and top_k >= 1")
        sequence = self.tower.user_tower == "sequence"
        if sequence:  # first: the split's default tower may be the one that refuses
            if self.loss != "softmax" or self.distill_weight or self.mask_seen_negatives:
                raise ValueError(
                    "the sequential user tower trains with loss 'softmax', without distillation "
                    "or mask_seen_negatives (user_tower 'fields' for the others)"
                )
            if self.history_length < 1:
                raise ValueError("the sequential user tower needs history_length >= 1")
        if self.negatives == "all" and self.loss != "softmax":
            raise ValueError("negatives 'all' (the full softmax) needs loss 'softmax'")
        if self.negatives == "in-batch" and not sequence and self.batch_size < 2:
            # Alone in its batch an example has no negative: every step's loss is 0.
            raise ValueError("the field tower's in-batch negatives need batch_size >= 2")
        if self.mask_seen_negatives and self.loss != "softmax":
            raise ValueError("mask_seen_negatives applies to loss 'softmax' only")
        if self.hard_negatives and (self.tower.user_tower != "sequence" or self.negatives == "all"):
            raise ValueError(
                "hard_negatives applies to the sequential user tower with sampled negatives "
                "(the full softmax, negatives 'all', already scores every item)"
            )
        if self.serve_history_length and (
            self.tower.user_tower != "sequence" or self.serve_history_length > self.history_length
        ):
            raise ValueError(
                "serve_history_length applies to the sequential user tower, at most "
                f"history_length ({self.history_length})"
            )
        drawn = {"recency_half_life_days": 0.0, "user_balance": 0.0, "target_window": 1}
        changed = [name for name, off in drawn.items() if getattr(self, name) != off]
        if changed and self.tower.user_tower == "sequence":
            # They shape a draw of interactions the sequential tower never makes (its logQ
            # would describe that draw, not its own).
            raise ValueError(
                f"{', '.join(changed)} applies to the field tower (the sequential tower "
                "trains on whole sequences, not drawn interactions)"
            )
        if self.length_window and self.tower.user_tower != "sequence":
            raise ValueError(
                "length_window applies to the sequential user tower (the field tower's "
                "examples are single interactions, all of one length)"
            )
        self.resolved_device()  # a device this machine does not have

    @property
    def softmax_negatives(self) -> int:
        """Sampled negatives the softmax adds to a batch (with a sampled `negatives` kind)."""
        return self.num_negatives or DEFAULT_SOFTMAX_NEGATIVES

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The dtype a training step's forward runs in under autocast on `device`; None:
        float32 throughout."""
        if self.precision == "bf16":
            return torch.bfloat16
        if self.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"device {self.device!r}: {exc}") from exc
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r}: the trainer runs on cpu or cuda[:N]")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available here")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {self.device!r}: {torch.cuda.device_count()} GPU(s) here")
        return device


def default_user_tower(split: str | None) -> str:
    """The user tower a run trains unless told: the one that won the validation of the
    split's protocol on ML-1M ("Retrieval quality" in the README). On a next-item split
    (`leave-last-n:N`) the sequential tower (validation NDCG@10 several times the field
    tower's); on a time split, or none (a production run), the field tower."""
    return "sequence" if split is not None and is_next_item(split) else TowerConfig().user_tower


# Defaults that differ by user tower, as `TrainConfig.create` takes them. The sequential
# tower trains as SASRec-family models do: a long history, small batches of whole sequences,
# the full softmax, dropout 0.2, early stopping on NDCG@10 over more epochs; no refit (the
# next-item validation item would join training; the run would cost twice as long). It
# trains on 200 items and serves the newest 50: on ML-1M the same validation, test and
# as-served figures as reading all 200, at 1.5-1.7x the requests served (README). Patience
# 10: its validation NDCG@10 still climbs at epoch 40-50 but moves +-0.003 from epoch to
# epoch, and patience 5 stopped a run at 43 whose epoch 48 validated 2.6 % higher (README).
PRESETS: dict[str, dict[str, Any]] = {
    "fields": {},
    "sequence": {
        "epochs": 50,
        "patience": 10,
        "batch_size": 64,
        "history_length": 200,
        "serve_history_length": 50,
        "negatives": "all",
        "refit": False,
        "validation_metric": "ndcg@10",
        "tower.field_dim": 64,
        "tower.dropout": 0.2,
    },
}

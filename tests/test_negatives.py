"""Which negatives a softmax run trains with: never silently fewer than it asked for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trainer_helpers import fast_config, small_dataset

from models.train import Trainer
from models.train_config import DEFAULT_SOFTMAX_NEGATIVES


def batch_loss(**overrides: object) -> float:
    dataset = small_dataset()
    trainer = Trainer(dataset, dataset.interactions, fast_config(**overrides))
    trainer.model.eval()  # no dropout: the losses differ by their candidates alone
    with torch.no_grad():
        return float(trainer.task.loss(np.arange(64)))


@pytest.mark.parametrize("negatives", ["uniform", "popularity", "mixed"])
def test_sampled_negatives_without_a_count_add_the_documented_default(negatives: str) -> None:
    """`--negatives uniform` with no `--num-negatives` adds DEFAULT_SOFTMAX_NEGATIVES sampled
    candidates to the batch's own positives: more candidates, a larger loss than in-batch
    alone, and the same loss as asking for that many explicitly."""
    in_batch = batch_loss(negatives="in-batch")
    default = batch_loss(negatives=negatives)
    explicit = batch_loss(negatives=negatives, num_negatives=DEFAULT_SOFTMAX_NEGATIVES)
    assert default > in_batch + 0.5, (default, in_batch)
    assert default == pytest.approx(explicit)

"""Distillation from an EASE teacher: its targets, the loss, and the student moving towards it."""

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from trainer_helpers import fast_config, interaction_task, small_dataset

from models.baselines import EASE
from models.dataset import Dataset
from models.distill import DistillationLoss, ease_targets
from models.train import Trainer
from models.train_config import TrainConfig
from models.trained import item_embeddings


def test_teacher_targets_are_eases_best_unseen_items() -> None:
    dataset = small_dataset("synthetic:seed=2,users=40,items=30")
    trainer = Trainer(dataset, dataset.interactions, fast_config(epochs=1))
    log = trainer.log
    targets = ease_targets(log, 30, top_k=5, temperature=0.5)
    assert targets.items.shape == targets.probs.shape == (len(log.user_ids), 5)
    torch.testing.assert_close(targets.probs.sum(1), torch.ones(len(log.user_ids)))
    # The reference: EASE fitted on the same interactions through the baseline's own path.
    ease = EASE()
    ease.fit(dataset.interactions, trainer.user_encoder.item_index)
    scores = ease.score(log.user_ids)
    for row in range(len(log.user_ids)):
        own = set(log.items[log.users == row].tolist())
        items = targets.items[row].tolist()
        assert not own & set(items)  # never an item the user already has
        unseen = [i for i in range(30) if i not in own]
        best = max(unseen, key=lambda i: scores[row, i])
        probs = targets.probs[row]
        assert items[int(probs.argmax())] == best
        # Higher teacher score, higher target probability.
        order = np.argsort(-scores[row, items], kind="stable")
        assert (np.diff(probs.numpy()[order]) <= 1e-6).all()
    mask = targets.seen_mask(np.array([0, 0, 1]))
    assert mask.shape == (3, 30) and torch.equal(mask[0], mask[1])
    assert set(mask[2].nonzero().flatten().tolist()) == set(log.items[log.users == 1].tolist())


def test_a_user_who_took_every_item_has_no_target_and_training_stays_finite() -> None:
    """All of one user's teacher scores are masked: their targets are zero (no loss), not NaN
    (every epoch's loss read NaN, and the manifest a bare NaN token)."""
    rows = [("all", f"i{j}", j) for j in range(15)]
    rows += [(f"u{u}", f"i{(u + j) % 15}", 100 + 10 * u + j) for u in range(40) for j in range(3)]
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    dataset = Dataset(
        "every-item",
        interactions,
        pd.DataFrame(index=pd.Index(sorted(set(interactions["user_id"])), name="user_id")),
        pd.DataFrame(index=pd.Index([f"i{j}" for j in range(15)], name="item_id")),
        (),
        (),
    )
    config = fast_config(epochs=2, distill_weight=1.0, batch_size=16)
    trainer = Trainer(dataset, dataset.interactions, config)
    targets = ease_targets(trainer.log, 15, top_k=5)
    heavy = list(trainer.log.user_ids).index("all")
    assert torch.equal(targets.probs[heavy], torch.zeros(5))
    others = torch.cat([targets.probs[:heavy], targets.probs[heavy + 1 :]])
    torch.testing.assert_close(others.sum(1), torch.ones(len(others)))
    losses = [record["loss"] for record in trainer.fit().history]
    assert all(math.isfinite(loss) for loss in losses), losses


def test_teacher_temperature_sharpens_the_targets() -> None:
    dataset = small_dataset("synthetic:seed=2,users=40,items=30")
    log = Trainer(dataset, dataset.interactions, fast_config(epochs=1)).log
    sharp = ease_targets(log, 30, top_k=10, temperature=0.1).probs.max(1).values
    soft = ease_targets(log, 30, top_k=10, temperature=10.0).probs.max(1).values
    assert (sharp > soft).all()


def test_distillation_loss_is_the_soft_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, torch.finfo(torch.float32).min]])
    items = torch.tensor([[0, 1], [1, 0]])
    probs = torch.tensor([[0.75, 0.25], [1.0, 0.0]])
    got = DistillationLoss()(logits, items, probs)
    z0 = math.log(math.exp(2) + 1 + math.exp(-1))
    expected = (0.75 * (z0 - 2) + 0.25 * z0 + math.log(2)) / 2  # row 1: a masked third item
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_bad_distillation_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="distillation"):
        TrainConfig(distill_weight=-1.0)
    with pytest.raises(ValueError, match="distillation"):
        TrainConfig(distill_temperature=0.0)


def overlap_with_teacher(weight: float) -> float:
    dataset = small_dataset()
    config = fast_config(epochs=4, distill_weight=weight, distill_top_k=10, popularity_prior=0.0)
    trainer = Trainer(dataset, dataset.interactions, config)
    trained = trainer.fit()
    teacher = ease_targets(trainer.log, len(trainer.item_ids), top_k=10)
    users = torch.from_numpy(trainer.log.user_end - 1)
    with torch.no_grad():
        features = interaction_task(trainer).user_features(users, users)
        vectors = trained.model.user_tower(features)
        scores = vectors @ torch.from_numpy(item_embeddings(trained)).T
    scores = scores.masked_fill(teacher.seen_mask(np.arange(len(users))), -torch.inf)
    top = scores.topk(10, dim=1).indices
    hits = (top.unsqueeze(2) == teacher.items.unsqueeze(1)).any(2).float()
    return float(hits.mean())


def test_distillation_pulls_the_student_towards_the_teacher() -> None:
    assert overlap_with_teacher(5.0) > overlap_with_teacher(0.0) + 0.05


def test_distillation_is_off_by_default() -> None:
    dataset = small_dataset("synthetic:seed=2,users=40,items=30")
    assert interaction_task(Trainer(dataset, dataset.interactions, fast_config())).teacher is None
    config = dataclasses.replace(fast_config(), distill_weight=0.5)
    assert interaction_task(Trainer(dataset, dataset.interactions, config)).teacher is not None

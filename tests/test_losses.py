"""Losses (hand-computed values, accidental hits, logQ), samplers, and every loss x negatives
combination actually learning on synthetic data through the real `Trainer`."""

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from trainer_helpers import fast_config, interaction_task, small_dataset

from models import losses
from models.losses import (
    BinaryCrossEntropyLoss,
    Logits,
    PairwiseLogisticLoss,
    SampledSoftmaxLoss,
    TripletHingeLoss,
    full_softmax_cross_entropy,
)
from models.samplers import in_batch_log_q, popularity_sampler, uniform_sampler
from models.train import Trainer


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def divided_by(temperature: float) -> Logits:
    """Cosines -> logits as a `TwoTower` of this temperature turns them (`TwoTower.logits`)."""
    return lambda cosines: cosines / temperature


# --- sampled softmax ------------------------------------------------------------------------

E1 = [1.0, 0.0]
E2 = [0.0, 1.0]


def test_softmax_masks_a_duplicate_positive_instead_of_treating_it_as_negative() -> None:
    users = torch.tensor([E1, E2, E1])
    positives = torch.tensor([E1, E2, E1])
    ids = torch.tensor([5, 6, 5])  # rows 0 and 2 share item 5
    loss = SampledSoftmaxLoss(divided_by(1.0), logq_correction=False)
    got = loss(users, positives, ids, torch.zeros(3))
    # Logits are the dot products. Row 0: column 2 is its own item again, so only column 1
    # competes: log(e^1 + e^0) - 1. Row 1: log(e^0 + e^1 + e^0) - 1. Row 2 mirrors row 0.
    expected = (2 * math.log(math.e + 1) + math.log(math.e + 2)) / 3 - 1
    assert got.item() == pytest.approx(expected, abs=1e-6)
    unmasked = (2 * math.log(2 * math.e + 1) + math.log(math.e + 2)) / 3 - 1
    assert got.item() < unmasked - 0.1


def test_softmax_leaves_out_candidates_the_user_has_seen() -> None:
    users = torch.tensor([E1, E2, E1])
    positives = torch.tensor([E1, E2, [0.6, 0.8]])
    ids = torch.tensor([5, 6, 7])
    loss = SampledSoftmaxLoss(divided_by(1.0), logq_correction=False)
    seen = torch.tensor([[True, True, False], [False, False, False], [False, False, False]])
    masked = loss(users, positives, ids, torch.zeros(3), seen=seen)
    # Row 0 no longer competes with item 6 (seen); its own positive is never masked.
    row0 = math.log(math.e + math.exp(0.6)) - 1
    row1 = math.log(1 + math.e + math.exp(0.8)) - 1
    row2 = math.log(math.e + 1 + math.exp(0.6)) - 0.6
    assert masked.item() == pytest.approx((row0 + row1 + row2) / 3, rel=1e-5)


def test_trainer_masks_each_users_own_items_as_negatives() -> None:
    dataset = small_dataset()
    trainer = Trainer(dataset, dataset.interactions, fast_config(mask_seen_negatives=True))
    log = trainer.log
    batch = np.arange(0, len(log.items), 7)
    candidates = torch.from_numpy(log.items[batch])
    seen = interaction_task(trainer).seen(torch.from_numpy(batch), candidates)
    assert seen is not None
    owned = [set(log.items[log.users == u].tolist()) for u in range(len(log.user_ids))]
    expected = [[int(c) in owned[log.users[e]] for c in candidates] for e in batch]
    np.testing.assert_array_equal(seen.numpy(), expected)
    assert seen.diagonal().all() and not seen.all()
    plain = Trainer(dataset, dataset.interactions, fast_config())
    assert interaction_task(plain).seen(torch.from_numpy(batch), candidates) is None


def test_the_mask_and_the_logq_correction_reach_the_training_loss() -> None:
    """Both were checked as values only: a loss that left either out passed every test. The
    same seed gives the same towers; the batch holds users' own other items, which the mask
    drops, and items of unequal frequency, which the correction weighs."""
    dataset = small_dataset()

    def batch_loss(**options: Any) -> float:
        trainer = Trainer(dataset, dataset.interactions, fast_config(**options))
        trainer.model.eval()  # no dropout: the same towers score the same
        batch = np.arange(0, len(trainer.log.items), 7)  # the batch of the test above
        with torch.no_grad():
            return float(interaction_task(trainer).loss(batch))

    both = batch_loss(mask_seen_negatives=True, logq_correction=True)
    assert both == batch_loss(mask_seen_negatives=True, logq_correction=True)
    assert both < batch_loss(mask_seen_negatives=False, logq_correction=True) - 1e-4
    assert abs(both - batch_loss(mask_seen_negatives=True, logq_correction=False)) > 1e-3


def test_softmax_masks_sampled_negatives_equal_to_the_positive() -> None:
    users = torch.tensor([E1, E2])
    positives = torch.tensor([E1, E2])
    negatives = torch.tensor([E2, E1])  # sampled items 6 and 5 again
    loss = SampledSoftmaxLoss(divided_by(1.0), logq_correction=False)
    got = loss(
        users, positives, torch.tensor([5, 6]), torch.zeros(2),
        negatives, torch.tensor([6, 5]), torch.zeros(2),
    )  # fmt: skip
    # Row 0 (item 5): candidates 5, 6, 6, 5 (masked) -> logits 1, 0, 0.
    # Row 1 (item 6): candidates 5, 6, 6 (masked), 5 -> logits 0, 1, 0.
    expected = math.log(math.e + 2) - 1
    assert got.item() == pytest.approx(expected, abs=1e-6)
    unmasked = math.log(2 * math.e + 2) - 1
    assert got.item() < unmasked - 0.1


def reference_softmax(
    users: Tensor,
    candidates: Tensor,
    positive_ids: list[int],
    candidate_ids: list[int],
    logq: list[float],
    temperature: float,
) -> float:
    """Cross-entropy over logits u.c / T - log q(c), written out element by element."""
    total = 0.0
    for i, user in enumerate(users.tolist()):
        logits = {}
        for j, cand in enumerate(candidates.tolist()):
            if j != i and candidate_ids[j] == positive_ids[i]:
                continue
            dot = sum(a * b for a, b in zip(user, cand, strict=True))
            logits[j] = dot / temperature - logq[j]
        total += math.log(sum(math.exp(v) for v in logits.values())) - logits[i]
    return total / len(users)


def unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_logq_correction_subtracts_log_q_from_every_logit() -> None:
    gen = torch.Generator().manual_seed(3)
    users = unit(torch.randn(4, 3, generator=gen))
    positives = unit(torch.randn(4, 3, generator=gen))
    negatives = unit(torch.randn(3, 3, generator=gen))
    pos_ids, neg_ids = [1, 2, 1, 3], [4, 2, 9]
    pos_q, neg_q = [0.1, 0.3, 0.1, 0.05], [0.02, 0.3, 0.5]
    args = (
        users,
        positives,
        torch.tensor(pos_ids),
        torch.log(torch.tensor(pos_q)),
        negatives,
        torch.tensor(neg_ids),
        torch.log(torch.tensor(neg_q)),
    )
    candidates = torch.cat([positives, negatives])
    ids, q = pos_ids + neg_ids, pos_q + neg_q
    corrected = SampledSoftmaxLoss(divided_by(0.2), logq_correction=True)(*args).item()
    plain = SampledSoftmaxLoss(divided_by(0.2), logq_correction=False)(*args).item()
    log_q = [math.log(v) for v in q]
    expected = reference_softmax(users, candidates, pos_ids, ids, log_q, 0.2)
    assert corrected == pytest.approx(expected, rel=1e-5)
    assert plain == pytest.approx(
        reference_softmax(users, candidates, pos_ids, ids, [0.0] * 7, 0.2), rel=1e-5
    )
    assert abs(corrected - plain) > 1e-3
    # A log q shared by every candidate shifts all logits alike: the softmax is unchanged.
    same = SampledSoftmaxLoss(divided_by(0.2), logq_correction=True)(
        users, positives, torch.tensor(pos_ids), torch.full((4,), -2.0)
    )
    without = SampledSoftmaxLoss(divided_by(0.2), logq_correction=False)(
        users, positives, torch.tensor(pos_ids), torch.full((4,), -2.0)
    )
    assert same.item() == pytest.approx(without.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("loss", "negatives", "distill_weight"),
    [
        ("softmax", "in-batch", 0.0),
        ("softmax", "mixed", 0.0),
        ("softmax", "all", 0.0),
        ("softmax", "in-batch", 1.0),
        ("bce", "uniform", 0.0),
        ("logistic", "popularity", 0.0),
        ("hinge", "uniform", 0.0),
    ],
)
def test_the_trainers_losses_take_the_temperature_from_the_model(
    loss: str, negatives: str, distill_weight: float
) -> None:
    """One place applies the temperature (`TwoTower.logits`): a model given another
    temperature trains on the loss of a run configured with it; the hinge, on cosines, on
    the same loss."""
    dataset = small_dataset()

    def batch_loss(temperature: float, model_temperature: float | None = None) -> float:
        config = fast_config(
            loss=loss, negatives=negatives, num_negatives=8, distill_weight=distill_weight,
            temperature=temperature,
        )  # fmt: skip
        trainer = Trainer(dataset, dataset.interactions, config)
        if model_temperature is not None:
            trainer.model.temperature = model_temperature
        trainer.model.eval()
        with torch.no_grad():
            return trainer.task.loss(np.arange(128)).item()

    moved = batch_loss(0.05, model_temperature=0.2)
    assert moved == pytest.approx(batch_loss(0.2), rel=1e-6)
    if loss == "hinge":
        assert moved == pytest.approx(batch_loss(0.05), rel=1e-6)
    else:
        assert abs(moved - batch_loss(0.05)) > 1e-3


# --- pointwise and pairwise -----------------------------------------------------------------


def test_pointwise_and_pairwise_losses_by_hand() -> None:
    users = torch.tensor([[1.0, 0.0]])
    positives = torch.tensor([[0.6, 0.8]])  # score 0.6
    negatives = torch.tensor([[[0.8, 0.6], [0.0, 1.0]]])  # scores 0.8 and 0
    bce = BinaryCrossEntropyLoss(divided_by(0.5))(users, positives, negatives).item()
    # Logits 1.2 (label 1), 1.6 and 0 (label 0), averaged over the three.
    assert bce == pytest.approx((softplus(-1.2) + softplus(1.6) + softplus(0.0)) / 3, rel=1e-6)
    hinge = TripletHingeLoss(margin=0.3)(users, positives, negatives).item()
    assert hinge == pytest.approx((0.3 - 0.6 + 0.8 + 0.0) / 2, rel=1e-6)
    logistic = PairwiseLogisticLoss(divided_by(0.5))(users, positives, negatives).item()
    assert logistic == pytest.approx((softplus(0.4) + softplus(-1.2)) / 2, rel=1e-6)


# --- samplers -------------------------------------------------------------------------------


def test_popularity_sampler_follows_count_to_the_three_quarters() -> None:
    counts = np.array([0, 1, 16, 81])  # unseen items count as 1: weights 1, 1, 8, 27
    expected = np.array([1, 1, 8, 27]) / 37
    sampler = popularity_sampler(counts, torch.Generator().manual_seed(0))
    rows, log_q = sampler.sample(200_000)
    assert rows.dtype == torch.int64 and rows.shape == (200_000,)
    np.testing.assert_allclose(log_q.numpy(), np.log(expected)[rows.numpy()], rtol=1e-6)
    freq = np.bincount(rows.numpy(), minlength=4) / len(rows)
    np.testing.assert_allclose(freq, expected, atol=0.005)
    again, _ = popularity_sampler(counts, torch.Generator().manual_seed(0)).sample(200_000)
    assert torch.equal(rows, again)


def test_uniform_sampler() -> None:
    sampler = uniform_sampler(5, torch.Generator().manual_seed(1))
    rows, log_q = sampler.sample(100_000)
    freq = np.bincount(rows.numpy(), minlength=5) / len(rows)
    np.testing.assert_allclose(freq, np.full(5, 0.2), atol=0.01)
    assert torch.allclose(log_q, torch.full((100_000,), math.log(0.2)))


def test_in_batch_log_q_is_the_share_of_positives() -> None:
    log_q = in_batch_log_q(np.array([3, 0, 1]))  # unseen counts as 1: shares 3/5, 1/5, 1/5
    torch.testing.assert_close(log_q, torch.log(torch.tensor([0.6, 0.2, 0.2])))


# --- every objective learns -----------------------------------------------------------------


def full_loss(trainer: Trainer) -> float:
    """Mean loss over the whole log in fixed batches, eval mode, with fixed negative draws."""
    trainer.model.eval()
    trainer.generator.manual_seed(1234)
    n = len(trainer.log.items)
    with torch.no_grad():
        losses = [
            trainer.task.loss(np.arange(start, min(start + 256, n))).item()
            for start in range(0, n, 256)
        ]
    return float(np.mean(losses))


COMBINATIONS = [
    (loss, negatives, True)
    for loss in ("softmax", "bce", "hinge", "logistic")
    for negatives in ("in-batch", "uniform", "popularity", "mixed")
] + [("softmax", negatives, False) for negatives in ("in-batch", "popularity", "all")]


@pytest.mark.parametrize(("loss", "negatives", "logq"), COMBINATIONS)
def test_each_loss_decreases_with_each_negative_sampler(
    loss: str, negatives: str, logq: bool
) -> None:
    dataset = small_dataset()
    config = fast_config(
        loss=loss, negatives=negatives, num_negatives=8, logq_correction=logq, epochs=2
    )
    trainer = Trainer(dataset, dataset.interactions, config)
    sampler = interaction_task(trainer).sampler
    if negatives in ("in-batch", "all"):
        assert sampler is None
    else:
        assert sampler is not None
        counts = trainer.log.item_counts(len(trainer.item_ids))
        uniform = negatives == "uniform"
        weights = np.ones(len(counts)) if uniform else np.maximum(counts, 1) ** 0.75
        np.testing.assert_allclose(sampler.probs.numpy(), weights / weights.sum(), rtol=1e-5)
    before = full_loss(trainer)
    result = trainer.fit()
    after = full_loss(trainer)
    assert np.isfinite(before) and np.isfinite(after)
    assert after < 0.8 * before, (before, after)
    assert [h["epoch"] for h in result.history] == [1.0, 2.0]
    assert result.history[1]["loss"] < result.history[0]["loss"]


def _full_softmax_case(n: int, c: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(n + c)
    users = (torch.randn(n, 8, generator=g, dtype=dtype) * 3).requires_grad_()
    items = torch.randn(c, 8, generator=g, dtype=dtype).requires_grad_()
    return users, items, torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("chunk_logits", [1, 13 * 4, 13 * 7, 1 << 21])  # 1 row .. all at once
def test_the_chunked_full_softmax_is_torchs_cross_entropy_and_its_gradients(
    chunk_logits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(losses, "CHUNK_LOGITS", chunk_logits)
    users, items, targets = _full_softmax_case(30, 13, torch.float64)
    loss = full_softmax_cross_entropy(users, items, targets)
    (grad_users, grad_items) = torch.autograd.grad(loss, (users, items))
    want = torch.nn.functional.cross_entropy(users @ items.T, targets)
    (want_users, want_items) = torch.autograd.grad(want, (users, items))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_users, want_users, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_items, want_items, rtol=1e-12, atol=1e-12)


def test_the_chunked_full_softmax_under_autocast_runs_as_torchs_cross_entropy_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(losses, "CHUNK_LOGITS", 13 * 4)
    users, items, targets = _full_softmax_case(30, 13, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = full_softmax_cross_entropy(users, items, targets)
        want = torch.nn.functional.cross_entropy(users @ items.T, targets)
    assert loss.dtype == want.dtype == torch.float32
    got, expected = (
        torch.autograd.grad(loss, (users, items)),
        torch.autograd.grad(want, (users, items)),
    )
    exact = torch.nn.functional.cross_entropy(users @ items.T, targets)
    torch.testing.assert_close(loss, want, rtol=1e-2, atol=1e-2)
    assert loss != exact  # the products did run in bfloat16
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=0.05, atol=0.02)

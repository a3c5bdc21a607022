"""The training loop: device, seed reproducibility, early stopping, quality on planted data."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from trainer_helpers import fast_config, interaction_task, small_dataset

from models.features import HISTORY
from models.pipeline import run_training
from models.popularity_prior import PRIOR_GRID, PRIOR_HALF_LIVES, serving_item_matrix
from models.recommender import TwoTowerRecommender
from models.splits import NoReturningUsersError, make_split, validation_split
from models.towers import TowerConfig
from models.train import Trainer
from models.train_config import TrainConfig
from models.trained import TrainedModel, item_embeddings
from models.validation import Validator, carve_validation, choose_prior_weight


def test_device_auto_is_cuda_only_when_present() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert TrainConfig().resolved_device().type == expected
    assert TrainConfig(device="cpu").resolved_device() == torch.device("cpu")
    dataset = small_dataset("synthetic:seed=2,users=40,items=30")
    trainer = Trainer(dataset, dataset.interactions, fast_config(epochs=1))
    assert trainer.device.type == expected
    assert {p.device.type for p in trainer.model.parameters()} == {expected}


def test_precision_auto_is_bf16_only_on_a_cuda_device_that_has_it() -> None:
    cpu = torch.device("cpu")
    assert TrainConfig().autocast_dtype(cpu) is None  # fp32 on a CPU unless asked
    assert TrainConfig(precision="bf16").autocast_dtype(cpu) == torch.bfloat16
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        assert TrainConfig().autocast_dtype(torch.device("cuda")) == expected
    assert TrainConfig(precision="fp32").autocast_dtype(torch.device("cuda")) is None
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp16")  # type: ignore[arg-type]


def test_mixed_precision_trains_as_float32_does_with_float32_weights() -> None:
    # bf16 autocast runs on a CPU too: the same run in both precisions learns alike.
    dataset = small_dataset()
    runs = {}
    for precision in ("fp32", "bf16"):
        config = fast_config(epochs=4, precision=precision, negatives="mixed", num_negatives=16)
        trainer = Trainer(dataset, dataset.interactions, config)
        runs[precision] = [record["loss"] for record in trainer.fit().history]
        assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert bf16[-1] < bf16[0] - 0.1, bf16
    np.testing.assert_allclose(bf16, fp32, rtol=0.02)
    assert bf16 != fp32  # and it did run in bfloat16


def train_with_seed(seed: int) -> TrainedModel:
    dataset = small_dataset()
    # Every source of randomness is in play: init, shuffling, dropout, sampled negatives.
    tower = TowerConfig(field_dim=16, hidden=(32,), out_dim=16, history_encoder="attention")
    config = fast_config(
        seed=seed,
        tower=dataclasses.replace(tower, dropout=0.2),
        negatives="mixed",
        num_negatives=16,
    )
    return Trainer(dataset, dataset.interactions, config).fit()


def test_same_seed_same_model_other_seed_other_model() -> None:
    first, again, other = train_with_seed(7), train_with_seed(7), train_with_seed(8)
    np.testing.assert_array_equal(item_embeddings(first), item_embeddings(again))
    assert first.history == again.history
    assert not np.allclose(item_embeddings(first), item_embeddings(other))
    assert first.history != other.history


def test_item_embeddings_layout() -> None:
    dataset = small_dataset("synthetic:seed=2,users=40,items=30")
    trained = Trainer(dataset, dataset.interactions, fast_config(epochs=1)).fit()
    embeddings = item_embeddings(trained, batch_size=7)  # several batches
    assert embeddings.dtype == np.float32 and embeddings.shape == (30, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert trained.item_ids == [str(i) for i in dataset.items.index]
    np.testing.assert_allclose(embeddings, item_embeddings(trained), rtol=0, atol=1e-6)
    assert trained.best_epoch == 1  # no validation: the last epoch


class ScriptedValidation:
    """Returns fixed validation scores and snapshots the model seen at each epoch."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = scores
        self.snapshots: list[np.ndarray] = []

    def __call__(self, trained: TrainedModel) -> dict[str, float]:
        self.snapshots.append(item_embeddings(trained))
        score = self.scores[len(self.snapshots) - 1]
        return {"recall@50": score, "pooled_recall@50": score}


def test_early_stopping_stops_and_keeps_the_best_epoch() -> None:
    dataset = small_dataset("synthetic:seed=2,users=60,items=40")
    validate = ScriptedValidation([0.1, 0.3, 0.2, 0.25, 0.9, 0.95])
    config = fast_config(epochs=6, patience=2)
    trained = Trainer(dataset, dataset.interactions, config, validate).fit()
    # Epochs 3 and 4 do not beat epoch 2: stop after epoch 4, never see the 0.9.
    assert len(validate.snapshots) == 4
    assert [h["epoch"] for h in trained.history] == [1.0, 2.0, 3.0, 4.0]
    assert [h["recall@50"] for h in trained.history] == [0.1, 0.3, 0.2, 0.25]
    assert trained.best_epoch == 2
    np.testing.assert_array_equal(item_embeddings(trained), validate.snapshots[1])
    assert not np.array_equal(validate.snapshots[1], validate.snapshots[3])


def test_patience_zero_trains_every_epoch_and_keeps_the_best() -> None:
    dataset = small_dataset("synthetic:seed=2,users=60,items=40")
    validate = ScriptedValidation([0.5, 0.1, 0.1, 0.1])
    trained = Trainer(dataset, dataset.interactions, fast_config(epochs=4), validate).fit()
    assert len(trained.history) == 4
    assert trained.best_epoch == 1
    np.testing.assert_array_equal(item_embeddings(trained), validate.snapshots[0])


def test_a_diverging_run_stops_at_its_first_non_finite_epoch() -> None:
    # It trained every epoch, then failed the export's parity check ("max abs diff nan").
    dataset = small_dataset()
    config = fast_config(epochs=5, lr=1e30)
    with pytest.raises(ValueError, match=r"training diverged in epoch 1 \(mean loss nan\)"):
        Trainer(dataset, dataset.interactions, config).fit()


def test_no_known_items_is_an_error() -> None:
    dataset = small_dataset("synthetic:seed=2,users=40,items=30")
    unknown = dataset.interactions.assign(item_id="not-an-item")
    with pytest.raises(ValueError, match="no training interactions"):
        Trainer(dataset, unknown, fast_config()).fit()


def test_trained_model_beats_most_popular_on_planted_data() -> None:
    dataset = small_dataset()
    config = fast_config(epochs=6, patience=2, validation_fraction=0.1)
    run = run_training(dataset, "last-10pct", config, None, baselines=True)
    assert run.bundle is None and run.split is not None
    assert set(run.results) == {"two_tower", "most_popular", "itemcf", "itemcf_iuf", "ease"}
    two_tower = run.results["two_tower"].means["recall@50"]
    popular = run.results["most_popular"].means["recall@50"]
    assert two_tower > popular + 0.1, (two_tower, popular)
    # Early stopping ran on a validation slice carved off the training part.
    history = run.trained.history
    assert all("recall@50" in record and "ndcg@10" in record for record in history)
    # By default on pooled recall (total hits / total relevant) of the validation slice.
    assert config.validation_metric == "pooled_recall@50"
    best = max(history, key=lambda r: r["pooled_recall@50"])
    assert run.trained.best_epoch == int(best["epoch"])
    assert run.report is not None
    assert run.report["split"] == "last-10pct"
    assert run.report["results"]["two_tower"] == run.results["two_tower"].means
    assert run.report["n_test_interactions"] == len(run.split.test)


def test_split_none_trains_on_everything_without_a_report() -> None:
    dataset = small_dataset("synthetic:seed=2,users=40,items=30")
    run = run_training(dataset, "none", fast_config(epochs=1), None)
    assert run.split is None and run.report is None and run.results == {}
    assert len(run.trained.history) == 1


def test_recommender_refuses_another_catalogue() -> None:
    dataset = small_dataset("synthetic:seed=2,users=40,items=30")
    trained = Trainer(dataset, dataset.interactions, fast_config(epochs=1)).fit()
    rec = TwoTowerRecommender(trained, dataset.users)
    with pytest.raises(ValueError, match="catalogue differs"):
        rec.fit(dataset.interactions, {"i0": 0})
    rec.fit(dataset.interactions, dict(trained.user_encoder.item_index))
    scores = rec.score(["u0", "nobody"])
    assert scores.shape == (2, 30) and np.isfinite(scores).all()


def test_target_window_draws_positives_from_the_users_next_events() -> None:
    dataset = small_dataset("synthetic:seed=2,users=40,items=30")
    trainer = Trainer(dataset, dataset.interactions, fast_config(epochs=1, target_window=5))
    log = trainer.log
    batch = np.arange(len(log.items))
    targets = interaction_task(trainer).targets(batch)
    assert (targets >= batch).all() and (targets - batch < 5).all()
    assert (log.users[targets] == log.users[batch]).all()
    assert (targets > batch).any()
    next_item = Trainer(dataset, dataset.interactions, fast_config(epochs=1))
    np.testing.assert_array_equal(interaction_task(next_item).targets(batch), batch)


def test_logq_follows_the_positives_a_target_window_draws() -> None:
    """With a window, a user's last events stand in for the draws past the log's end, so the
    positives' frequencies are not the items' counts; logQ must follow the draws."""
    dataset = small_dataset("synthetic:seed=2,users=200,items=30")
    trainer = Trainer(dataset, dataset.interactions, fast_config(epochs=1, target_window=20))
    log, rng = trainer.log, np.random.default_rng(0)
    events = np.arange(len(log.items))
    drawn = sum(
        np.bincount(log.items[log.draw_targets(events, 20, rng)], minlength=30) for _ in range(500)
    )
    empirical = drawn / drawn.sum()
    q = np.exp(interaction_task(trainer).in_batch_logq.cpu().numpy())
    assert (empirical > 0).all()
    np.testing.assert_allclose(q, empirical, rtol=0.05)
    counts = np.bincount(log.items, minlength=30)
    assert not np.allclose(counts / counts.sum(), empirical, rtol=0.05)


def test_latest_history_mode_reads_what_serving_reads_minus_the_positive() -> None:
    dataset = small_dataset("synthetic:seed=2,users=40,items=30")
    config = fast_config(epochs=1, history_mode="latest", history_length=8, history_dropout=0.0)
    trainer = Trainer(dataset, dataset.interactions, config)
    log = trainer.log
    batch = np.arange(len(log.items))
    examples = torch.from_numpy(batch)
    hist = interaction_task(trainer).user_features(examples, examples)[HISTORY].numpy()
    latest = log.user_histories(8)[log.users[batch]]
    for e in batch:
        # The user's latest items (as the service will see them), with the positive removed.
        expected = list(latest[e])
        position = log.user_end[log.users[e]] - 1 - e
        if position < 8:
            del expected[position]
            older = log.user_end[log.users[e]] - 9
            expected.append(log.items[older] + 1 if older >= log.user_start[e] else 0)
        assert hist[e].tolist() == expected


def test_history_dropout_hides_a_share_of_the_training_history_and_closes_the_gaps() -> None:
    dataset = small_dataset("synthetic:seed=2,users=40,items=30")
    plain = fast_config(epochs=1, history_length=8, history_dropout=0.0)
    full = Trainer(dataset, dataset.interactions, plain)
    dropped = Trainer(
        dataset, dataset.interactions, dataclasses.replace(plain, history_dropout=0.5)
    )
    batch = torch.arange(len(full.log.items))
    before = interaction_task(full).user_features(batch, batch)[HISTORY].numpy()
    after = interaction_task(dropped).user_features(batch, batch)[HISTORY].numpy()
    for kept, full_row in zip(after, before, strict=True):
        n = int((kept > 0).sum())
        # Packed newest first like a shorter served history: no gap before the last item...
        assert (kept[:n] > 0).all() and (kept[n:] == 0).all()
        # ...and an in-order subsequence of the full history.
        rest = iter(full_row[full_row > 0].tolist())
        assert all(item in rest for item in kept[:n].tolist())
    share = 1 - (after > 0).sum() / (before > 0).sum()
    assert 0.4 < share < 0.6


def test_popularity_prior_is_folded_into_the_served_vectors() -> None:
    dataset = small_dataset()
    counts = np.arange(200)
    plain = Trainer(dataset, dataset.interactions, fast_config(popularity_prior=0.0)).fit()
    assert serving_item_matrix(plain, counts).shape == (200, 32)
    prior = Trainer(dataset, dataset.interactions, fast_config(popularity_prior=0.5)).fit()
    items = serving_item_matrix(prior, counts)
    # Unit vectors [v, b, r] / M: the prior b in cosine units, r pads each to length M.
    assert items.shape == (200, 34)
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, rtol=1e-6)
    scale = 1.0 / np.linalg.norm(items[:, :32], axis=1)  # M, the same for every item
    np.testing.assert_allclose(scale, scale[0], rtol=1e-5)
    np.testing.assert_allclose(items[:, 32] * scale, 0.05 * 0.5 * np.log1p(counts), rtol=1e-5)
    assert abs(items[-1, 33]) < 1e-6  # the largest prior needs no padding
    # The served score is the scaled cosine plus the prior, up to one positive factor.
    rec = TwoTowerRecommender(prior, dataset.users)
    rec.fit(dataset.interactions, prior.user_encoder.item_index)
    users = rec.user_embeddings(["u0", "u1"])
    assert users.shape == (2, 34)
    np.testing.assert_allclose(np.linalg.norm(users, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(users[:, 32:], [[0.5**0.5, 0.0]] * 2, rtol=1e-6)
    cosine = users[:, :32] * 2**0.5 @ item_embeddings(prior).T
    rows = dataset.interactions["item_id"].map(prior.user_encoder.item_index)
    log_counts = np.log1p(np.bincount(rows, minlength=200))
    expected = cosine / 0.05 + 0.5 * log_counts
    served_scale = 1.0 / np.linalg.norm(rec.item_matrix[0, :32])  # M of these counts
    served = rec.score(["u0", "u1"]) * served_scale * 2**0.5 / 0.05
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-3)


def test_prior_weight_is_chosen_on_the_validation_slice() -> None:
    dataset = small_dataset()
    config = fast_config(epochs=2, patience=2, validation_fraction=0.1)
    run = run_training(dataset, "last-10pct", config, None)
    train = make_split(dataset.interactions, "last-10pct").train
    carve = validation_split(train, 0.1)
    validate = Validator(dataset, carve.train, carve.test, seed=0)
    scores = choose_prior_weight(run.trained, validate, "recall@50")
    pairs = {str(w) if not h else f"{w}@{h:g}d" for w in PRIOR_GRID for h in PRIOR_HALF_LIVES}
    assert set(scores) == pairs - {f"0.0@{h:g}d" for h in PRIOR_HALF_LIVES}
    trained = run.trained
    chosen = trained.prior_weight, trained.prior_half_life_days
    key = f"{chosen[0]}@{chosen[1]:g}d" if chosen[1] else str(chosen[0])
    assert scores[key] == max(scores.values())
    # The chosen pair is what the model now serves with: re-validating gives the same figure.
    assert validate(trained)["recall@50"] == scores[key]
    # A half-life fixed in the config is kept; only the weight is searched.
    fixed = dataclasses.replace(
        trained, config=dataclasses.replace(trained.config, prior_half_life_days=30.0)
    )
    searched = choose_prior_weight(fixed, validate, "recall@50")
    assert set(searched) == {"0.0"} | {f"{w}@30d" for w in PRIOR_GRID if w}
    weight, half_life = fixed.prior_weight, fixed.prior_half_life_days
    assert half_life == 30.0 or (weight == 0 and half_life == 0.0)
    assert searched[f"{weight}@30d" if weight else "0.0"] == max(searched.values())


def test_refit_trains_again_on_the_whole_training_period() -> None:
    dataset = small_dataset()
    config = fast_config(
        epochs=2,
        patience=2,
        validation_fraction=0.1,
        popularity_prior=0.5,
        prior_half_life_days=30.0,
        refit=False,
    )
    validated = run_training(dataset, "last-10pct", config, None).trained
    refitted = run_training(dataset, "last-10pct", dataclasses.replace(config, refit=True), None)
    again = refitted.trained
    # Same validated choices (epochs, prior) and record, new weights learnt from more data.
    assert (again.best_epoch, again.history, again.config.refit) == (
        validated.best_epoch,
        validated.history,
        True,
    )
    assert (again.prior_weight, again.prior_half_life_days) == (0.5, 30.0)
    assert not np.allclose(item_embeddings(again), item_embeddings(validated))
    assert refitted.results["two_tower"].means["recall@50"] > 0


def test_validation_min_gap_validates_on_returning_users_only() -> None:
    dataset = small_dataset()
    config = fast_config(
        epochs=1, patience=1, validation_fraction=0.1, popularity_prior=0.0, refit=False
    )
    everyone = run_training(dataset, "last-10pct", config, None)
    returning = run_training(
        dataset, "last-10pct", dataclasses.replace(config, validation_min_gap_days=20.0), None
    )
    # Same training (the fit part is never filtered), another validation population.
    np.testing.assert_array_equal(
        item_embeddings(everyone.trained), item_embeddings(returning.trained)
    )
    assert everyone.validation is not None and returning.validation is not None
    assert everyone.validation != returning.validation
    train = make_split(dataset.interactions, "last-10pct").train
    carve = validation_split(train, 0.1, min_gap_days=20.0)
    validate = Validator(dataset, carve.train, carve.test, seed=0)
    assert validate(returning.trained) == returning.validation


def test_user_balance_weighs_users_instead_of_interactions() -> None:
    dataset = small_dataset("synthetic:seed=2,users=40,items=30")
    plain = Trainer(dataset, dataset.interactions, fast_config(epochs=1))
    log = plain.log
    sizes = np.bincount(log.users)
    np.testing.assert_allclose(log.example_probabilities(0.0), 1 / len(log.items))
    per_user = np.bincount(log.users, weights=log.example_probabilities(1.0))
    np.testing.assert_allclose(per_user, 1 / len(sizes))  # every user alike
    half = np.bincount(log.users, weights=log.example_probabilities(0.5))
    np.testing.assert_allclose(half / half.sum(), np.sqrt(sizes) / np.sqrt(sizes).sum())
    trainer = Trainer(dataset, dataset.interactions, fast_config(epochs=1, user_balance=1.0))
    balanced = interaction_task(trainer)
    assert interaction_task(plain).example_probs is None and balanced.example_probs is not None
    # logQ follows the positives as drawn: each item's share of the balanced draw.
    share = np.bincount(log.items, weights=balanced.example_probs, minlength=30)
    # Fractional counts stay as they are (an item drawn 0.2 times is rarer than one drawn
    # once); only items never drawn, which never appear in a batch, count 1.
    counts = share * len(log.items)
    assert 0 < counts[counts > 0].min() < 1
    freq = np.where(counts > 0, counts, 1.0)
    expected = np.log(freq / freq.sum())
    np.testing.assert_allclose(balanced.in_batch_logq.cpu().numpy(), expected, rtol=1e-5)
    plain_logq = interaction_task(plain).in_batch_logq.cpu().numpy()
    assert not np.allclose(balanced.in_batch_logq.cpu().numpy(), plain_logq)
    trained = trainer.fit()
    assert np.isfinite(trained.history[0]["loss"])
    with pytest.raises(ValueError, match="user_balance"):
        TrainConfig(user_balance=-0.5)


def test_recency_half_life_draws_recent_interactions_more_often() -> None:
    dataset = small_dataset("synthetic:seed=2,users=40,items=30")
    config = fast_config(epochs=1, recency_half_life_days=30.0, user_balance=1.0)
    trainer = Trainer(dataset, dataset.interactions, config)
    log = trainer.log
    age_days = (log.timestamps.max() - log.timestamps) / 86400.0
    assert age_days.max() > 60  # the synthetic log spans more than two half-lives
    probs = log.example_probabilities(1.0, 30.0)
    # Each event's weight is the user's balance times 0.5 ** (age / 30 d), normalised.
    sizes = np.bincount(log.users)[log.users]
    expected = np.exp2(-age_days / 30.0) / sizes
    np.testing.assert_allclose(probs, expected / expected.sum())
    newest, oldest = age_days.argmin(), age_days.argmax()
    assert probs[newest] * sizes[newest] > 4 * probs[oldest] * sizes[oldest]
    task = interaction_task(trainer)
    np.testing.assert_allclose(task.example_probs, probs)
    # The draw follows the weights: recent events are drawn more often than they occur.
    rng = np.random.default_rng(0)
    drawn = np.concatenate([task.epoch_order(rng, 64) for _ in range(20)])
    assert np.median(age_days[drawn]) < np.median(age_days)
    # logQ follows the positives as drawn, not as logged.
    share = np.bincount(log.items, weights=probs, minlength=30) * len(log.items)
    freq = np.where(share > 0, share, 1.0)
    np.testing.assert_allclose(
        task.in_batch_logq.cpu().numpy(), np.log(freq / freq.sum()), rtol=1e-5
    )
    assert np.isfinite(trainer.fit().history[0]["loss"])
    with pytest.raises(ValueError, match="recency_half_life_days"):
        TrainConfig(recency_half_life_days=-1.0)
    with pytest.raises(ValueError, match="recency_half_life_days applies to the field tower"):
        TrainConfig(recency_half_life_days=30.0, tower=TowerConfig(user_tower="sequence"))


def test_validation_falls_back_to_every_user_when_none_returns() -> None:
    dataset = small_dataset()
    train = make_split(dataset.interactions, "last-10pct").train
    gap = {"validation_min_gap_days": 10_000.0}
    config = fast_config(validation_fraction=0.1, **gap)
    with pytest.raises(NoReturningUsersError):
        validation_split(train, 0.1, min_gap_days=10_000.0)
    carve = carve_validation(train, config)
    pd.testing.assert_frame_equal(carve.test, validation_split(train, 0.1).test)
    returning = carve_validation(train, dataclasses.replace(config, validation_min_gap_days=5.0))
    assert returning.test["user_id"].nunique() < carve.test["user_id"].nunique()
    # The training pipeline takes the same fallback instead of failing.
    config = dataclasses.replace(config, epochs=1, patience=1)
    run = run_training(dataset, "last-10pct", config, None)
    assert run.validation is not None and "pooled_recall@50" in run.validation

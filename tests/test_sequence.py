"""The sequential user tower and its objective: causal, served as trained, exported with
parity, and able to learn an order that a pooled history cannot see."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from trainer_helpers import fast_config, small_dataset

from models.dataset import ColumnSpec, Dataset
from models.examples import InteractionLog
from models.features import FeatureEncoder
from models.pipeline import run_training
from models.recommender import BundleRecommender, TwoTowerRecommender
from models.sequence_task import SequenceTask
from models.sequence_tower import SequenceUserTower
from models.sources import load_dataset
from models.splits import make_split
from models.towers import TowerConfig
from models.train import Trainer
from models.train_config import TrainConfig
from models.trained import item_embeddings
from models.validation import carve_validation

SEQUENCE = TowerConfig(field_dim=16, hidden=(32,), out_dim=16, user_tower="sequence", dropout=0.1)


def sequence_config(**overrides: object) -> TrainConfig:
    return fast_config(**({"tower": SEQUENCE, "negatives": "all", "lr": 5e-3} | overrides))


def sequence_task(trainer: Trainer) -> SequenceTask:
    """The sequential tower's task of `trainer`."""
    assert isinstance(trainer.task, SequenceTask)
    return trainer.task


def cycle_dataset(n_users: int = 150, n_items: int = 120, seed: int = 0) -> Dataset:
    """Each user walks the catalogue in order from a random start (item i, then i + 1, ...):
    what comes next depends on the order of the history, not on the set of its items."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        start, length = rng.integers(n_items), rng.integers(12, 25)
        for step in range(length):
            rows.append((f"u{u}", f"i{(start + step) % n_items}", 1_000_000 + 60 * (u + step)))
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    interactions = interactions.sort_values("timestamp", kind="stable").reset_index(drop=True)
    users = pd.DataFrame(
        {"group": [f"g{u % 3}" for u in range(n_users)]},
        index=pd.Index([f"u{u}" for u in range(n_users)], name="user_id"),
    )
    items = pd.DataFrame(
        {"kind": [f"k{i % 4}" for i in range(n_items)]},
        index=pd.Index([f"i{i}" for i in range(n_items)], name="item_id"),
    )
    return Dataset(
        "cycle",
        interactions,
        users,
        items,
        (ColumnSpec("group", "categorical"),),
        (ColumnSpec("kind", "categorical"),),
    )


def trained_tower() -> tuple[SequenceUserTower, FeatureEncoder]:
    dataset = small_dataset()
    trained = Trainer(dataset, dataset.interactions, sequence_config()).fit()
    tower = trained.model.user_tower
    assert isinstance(tower, SequenceUserTower)
    return tower.eval(), trained.user_encoder


def encoded(encoder: FeatureEncoder, histories: list[list[str]]) -> dict[str, torch.Tensor]:
    rows = [{"country": "JP", "age_group": "25-34", "activity": 3.0}] * len(histories)
    inputs = encoder.encode(rows, histories)
    return {name: torch.from_numpy(values) for name, values in inputs.items()}


def test_each_position_sees_only_itself_and_earlier_items() -> None:
    tower, encoder = trained_tower()
    features = encoded(encoder, [[], []])
    items = torch.tensor([[0, 0, 3, 5, 7, 9], [1, 2, 3, 4, 5, 6]])
    items = torch.nn.functional.pad(items, (encoder.history_length - 6, 0))
    with torch.no_grad():
        before = tower.sequence(features, items)
        changed = items.clone()
        changed[:, -1] = 11  # only the newest item differs
        after = tower.sequence(features, changed)
    assert torch.equal(before[:, :-1], after[:, :-1])
    assert not torch.allclose(before[:, -1], after[:, -1])
    assert torch.allclose(before.norm(dim=-1), torch.ones(before.shape[:2]), atol=1e-5)


def test_serving_reads_the_newest_first_history_as_training_reads_the_last_position() -> None:
    tower, encoder = trained_tower()
    catalogue = list(encoder.item_index)
    features = encoded(encoder, [catalogue[3:7], catalogue[: encoder.history_length], []])
    history = features["history"]
    assert history[0, :5].tolist() == [4, 5, 6, 7, 0]  # newest first, row + 1
    with torch.no_grad():
        served = tower(features)
        trained_at_last = tower.sequence(features, history.flip(1))[:, -1]
        scripted = torch.jit.script(tower)(features)
    torch.testing.assert_close(served, trained_at_last)
    torch.testing.assert_close(scripted, served)
    assert torch.isfinite(served[2]).all()  # no history: cold start, still a unit vector


def test_serving_reads_a_batch_of_any_lengths_as_each_user_alone() -> None:
    """A micro-batch pads every history to its longest: no user's vector may depend on the
    others', and a history holding a 0 reads only the items before it."""
    tower, encoder = trained_tower()
    catalogue = list(encoder.item_index)
    histories = [catalogue[:n] for n in (1, 3, encoder.history_length + 2, 0, 2)]
    with torch.no_grad():
        together = tower(encoded(encoder, histories))
        alone = torch.cat([tower(encoded(encoder, [h])) for h in histories])
        history = encoded(encoder, [catalogue[:3]])["history"]
        history[0, 3] = 0  # already padding: the 0 at position 3 ends the history...
        history[0, 4] = 7  # ...so this item after it is not read
        cut = tower({**encoded(encoder, [[]]), "history": history})
    torch.testing.assert_close(together, alone)
    torch.testing.assert_close(cut[0], together[1])


def test_sequences_are_each_users_latest_items_oldest_first_left_padded() -> None:
    dataset = cycle_dataset(n_users=3)
    config = sequence_config(history_length=5)
    trainer = Trainer(dataset, dataset.interactions, config)
    task = sequence_task(trainer)
    log = InteractionLog.build(dataset.interactions, trainer.user_encoder.item_index)
    for user in range(3):
        own = log.items[log.users == user]
        expected = own[-6:] + 1  # history_length + 1 items: inputs and their next items
        assert task.sequences(np.array([user]))[0].tolist() == expected.tolist()
    # What batches are gathered from, held on the model's device: every example's sequence.
    np.testing.assert_array_equal(task.examples.numpy(), task.sequences(task.users))
    short = dataset.interactions[dataset.interactions["user_id"] == "u0"].head(3)
    task = sequence_task(Trainer(dataset, short, config))
    assert task.sequences(np.array([0]))[0].tolist()[:3] == [0, 0, 0]


@pytest.mark.parametrize("window", [0, 50])
def test_an_epoch_visits_every_user_once_grouped_by_length_when_asked(window: int) -> None:
    dataset = cycle_dataset(n_users=400)
    config = sequence_config(history_length=30, length_window=window)
    task = sequence_task(Trainer(dataset, dataset.interactions, config))
    rng = np.random.default_rng(0)
    first, second = task.epoch_order(rng, 16), task.epoch_order(rng, 16)
    assert sorted(first.tolist()) == list(range(task.n_examples))
    assert first.tolist() != second.tolist()  # a new order every epoch
    lengths = (task.sequences(task.users)[:, :-1] > 0).sum(axis=1)

    def padding(order: np.ndarray) -> int:  # the padded cells of the batches' inputs
        batches = [lengths[order[i : i + 16]] for i in range(0, len(order), 16)]
        return sum(int((b.max() - b).sum()) for b in batches)

    shuffled = padding(rng.permutation(task.n_examples))
    if window:
        assert padding(first) < shuffled / 3
    else:  # a plain shuffle
        assert padding(first) > shuffled / 3


def test_a_grouped_batch_weighs_its_loss_by_its_positions() -> None:
    # Grouped batches of short and long sequences: each weighs by its positions over the
    # epoch's mean, so the epoch's objective is the mean over positions, as when shuffled.
    dataset = cycle_dataset(n_users=30)
    plain = sequence_task(Trainer(dataset, dataset.interactions, sequence_config(seed=3)))
    config = sequence_config(seed=3, length_window=4)
    grouped = sequence_task(Trainer(dataset, dataset.interactions, config))
    grouped.model.load_state_dict(plain.model.state_dict())
    plain.model.eval()
    grouped.model.eval()
    batch = np.arange(8)
    positions = int((plain.lengths[batch] - 1).sum())
    assert grouped.mean_positions == (plain.lengths - 1).sum()  # 30 users: one batch of 256
    weighted = plain.loss(batch) * positions / grouped.mean_positions
    torch.testing.assert_close(grouped.loss(batch), weighted, rtol=1e-5, atol=1e-6)


def test_dropping_the_batch_wide_padding_leaves_the_loss_as_it_was() -> None:
    dataset = cycle_dataset(n_users=30)
    task = sequence_task(Trainer(dataset, dataset.interactions, sequence_config(history_length=60)))
    task.model.eval()  # no dropout: the same inputs give the same loss
    batch = np.arange(8)
    examples = torch.from_numpy(batch)
    seqs = task.examples[examples].long()  # the full width, padding included
    assert (seqs[:, :10] == 0).all()  # the users here have 25 items at most
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    outputs = task.tower.sequence(task.example_features(examples), inputs)
    wanted = inputs > 0
    full = task._softmax(outputs[wanted], targets[wanted] - 1)
    torch.testing.assert_close(task.loss(batch), full, rtol=1e-5, atol=1e-6)


def test_the_full_softmax_is_the_cross_entropy_of_every_items_cosine_over_the_temperature() -> None:
    dataset = cycle_dataset(n_users=30)
    task = sequence_task(Trainer(dataset, dataset.interactions, sequence_config(temperature=0.2)))
    task.model.eval()  # the item tower's dropout off: both sides read the same item vectors
    users = torch.nn.functional.normalize(
        torch.randn(12, 16, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    targets = torch.arange(12) % task.items.all_rows.shape[0]
    with torch.no_grad():
        cosines = users @ task.items(task.items.all_rows).T
        want = torch.nn.functional.cross_entropy(cosines / 0.2, targets)
        torch.testing.assert_close(task._softmax(users, targets), want, rtol=1e-5, atol=1e-6)


def test_next_item_validation_holds_out_each_training_users_last_items() -> None:
    dataset = cycle_dataset()
    split = make_split(dataset.interactions, "leave-last-n:1")
    carve = carve_validation(split.train, sequence_config(), "leave-last-n:1")
    last = split.train.groupby("user_id").tail(1)
    assert sorted(map(tuple, carve.test[["user_id", "item_id"]].to_numpy())) == sorted(
        map(tuple, last[["user_id", "item_id"]].to_numpy())
    )
    events = ["user_id", "item_id", "timestamp"]
    test_events = set(map(tuple, split.test[events].to_numpy()))
    assert not test_events & set(map(tuple, carve.train[events].to_numpy()))  # never seen
    assert len(carve.train) + len(carve.test) == len(split.train)


@pytest.mark.slow
def test_the_sequence_tower_learns_an_order_a_pooled_history_cannot_see() -> None:
    dataset = cycle_dataset()
    sequence = run_training(
        dataset,
        "leave-last-n:1",
        sequence_config(
            epochs=20,
            batch_size=16,
            validation_fraction=0.1,
            validation_metric="recall@10",  # recall@50 saturates early on this toy
            popularity_prior=0.0,
        ),
        None,
        baselines=True,
    )
    pooled = run_training(
        dataset,
        "leave-last-n:1",
        fast_config(epochs=20, batch_size=64, popularity_prior=0.0, negatives="all"),
        None,
    )
    hit = sequence.results["two_tower"].means["hit_rate@10"]
    assert hit > 0.8, hit
    assert hit > pooled.results["two_tower"].means["hit_rate@10"] + 0.2
    assert hit > sequence.results["most_popular"].means["hit_rate@10"] + 0.4
    # Early stopping read each training user's last training item, never the test item.
    assert sequence.trained.history and "recall@10" in sequence.trained.history[-1]


def test_the_exported_sequence_tower_scores_as_the_trained_one(tmp_path: Path) -> None:
    dataset = small_dataset()
    run = run_training(dataset, "leave-last-n:1", sequence_config(epochs=1), tmp_path)
    assert run.bundle is not None and run.split is not None
    item_index = dataset.item_index()
    exported = BundleRecommender(run.bundle, dataset.users, item_index)
    exported.fit(run.split.train, item_index)
    eager = TwoTowerRecommender(run.trained, dataset.users)
    eager.fit(run.split.train, item_index)
    users = eager.known_users[:50]
    np.testing.assert_allclose(exported.score(users), eager.score(users), atol=1e-5)
    assert exported.manifest["model"]["user_tower"] == "sequence"


def test_a_tower_kept_to_its_newest_items_reads_a_long_history_as_the_full_one_its_newest(
    tmp_path: Path,
) -> None:
    """`serve_history_length` N: the trained, evaluated and exported tower reads each user's
    newest N items, as the full tower reads a history of those N; training is unchanged."""
    dataset = small_dataset()
    full = Trainer(dataset, dataset.interactions, sequence_config()).fit()
    run = run_training(dataset, "leave-last-n:1", sequence_config(serve_history_length=3), tmp_path)
    assert run.bundle is not None and run.split is not None
    short = Trainer(dataset, dataset.interactions, sequence_config(serve_history_length=3)).fit()
    assert short.user_encoder.history_length == 3 and full.user_encoder.history_length == 20
    assert short.history == full.history  # the same training, then the cut
    catalogue = list(full.user_encoder.item_index)
    histories = [catalogue[:12], catalogue[5:8], catalogue[:1], []]
    newest = [h[:3] for h in histories]
    with torch.no_grad():
        served = short.model.user_tower(encoded(short.user_encoder, histories))
        cut = full.model.user_tower(encoded(full.user_encoder, newest))
        uncut = full.model.user_tower(encoded(full.user_encoder, histories))
    torch.testing.assert_close(served, cut)
    assert not torch.allclose(served[0], uncut[0])  # 12 items read are not 3
    # The bundle serves the shorter read: its feature spec, its tower, its own evaluation.
    item_index = dataset.item_index()
    exported = BundleRecommender(run.bundle, dataset.users, item_index)
    assert exported.encoder.history_length == 3
    assert exported.manifest["training"]["serve_history_length"] == 3
    assert exported.manifest["training"]["history_length"] == 20
    exported.fit(run.split.train, item_index)
    eager = TwoTowerRecommender(run.trained, dataset.users)
    eager.fit(run.split.train, item_index)
    users = eager.known_users[:50]
    np.testing.assert_allclose(exported.score(users), eager.score(users), atol=1e-5)


@pytest.mark.parametrize("overrides", [{"serve_history_length": 21}, {"tower": TowerConfig()}])
def test_a_shorter_served_history_needs_the_sequence_tower_and_at_most_its_length(
    overrides: dict[str, object],
) -> None:
    with pytest.raises(ValueError, match="serve_history_length applies to the sequential"):
        sequence_config(**({"serve_history_length": 3} | overrides))
    with pytest.raises(ValueError, match="serve_history_length must be >= 0"):
        sequence_config(serve_history_length=-1)


@pytest.mark.parametrize(
    "overrides",
    [
        {"loss": "bce"},
        {"distill_weight": 0.5},
        {"mask_seen_negatives": True},
        {"history_length": 0},
    ],
)
def test_the_sequence_tower_refuses_options_it_does_not_train_with(
    overrides: dict[str, object],
) -> None:
    with pytest.raises(ValueError, match="sequential user tower"):
        TrainConfig(tower=SEQUENCE, **overrides)  # type: ignore[arg-type]


def test_in_batch_log_q_is_the_share_of_the_positives_an_epoch_trains_on() -> None:
    """The in-batch candidates are the batches' targets: each user's newest history_length + 1
    items less the first, not the whole log (a window of 6 here, ~14 items a user)."""
    dataset = load_dataset("synthetic:seed=1,users=120,items=150,per_user=40")
    config = sequence_config(negatives="in-batch", num_negatives=16, history_length=5)
    task = sequence_task(Trainer(dataset, dataset.interactions, config))
    ordered = dataset.interactions.sort_values("timestamp", kind="stable")
    windows = ordered.groupby("user_id", sort=False).tail(6)
    first = windows.groupby("user_id", sort=False).cumcount() == 0
    counts = windows[~first]["item_id"].value_counts()
    shares = counts.reindex(dataset.items.index, fill_value=0).to_numpy().astype(float)
    assert shares.sum() < len(dataset.interactions) / 2  # the window leaves most of the log out
    drawn = np.where(shares > 0, shares, 1)  # never drawn: 1, to keep the log finite
    expected = np.log(drawn / drawn.sum())
    np.testing.assert_allclose(task.log_q.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("negatives", ["in-batch", "uniform", "popularity", "mixed"])
def test_sampled_softmax_trains_the_sequence_tower(negatives: str) -> None:
    dataset = cycle_dataset(n_users=60)
    config = sequence_config(negatives=negatives, num_negatives=16, epochs=2)
    trainer = Trainer(dataset, dataset.interactions, config)
    losses = [record["loss"] for record in trainer.fit().history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    # Each draws its shared negatives as named (every path trains; only the draw tells them
    # apart): a batch whose every target is row 0 gives in-batch negatives of row 0 alone.
    drawn = sequence_task(trainer)._negatives(torch.zeros(8, dtype=torch.long))
    assert len(drawn) == 16
    from_batch = (drawn == 0).tolist()
    if negatives == "in-batch":
        assert all(from_batch)
    elif negatives == "mixed":
        assert all(from_batch[:8]) and not all(from_batch[8:])
    else:
        assert not all(from_batch)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"negatives": "mixed", "num_negatives": 16, "hard_negatives": 3}],
)
def test_mixed_precision_trains_the_sequence_tower_as_float32_does(
    overrides: dict[str, object],
) -> None:
    dataset = cycle_dataset(n_users=60)
    losses = {}
    for precision in ("fp32", "bf16"):
        config = sequence_config(epochs=4, batch_size=16, precision=precision, **overrides)
        trained = Trainer(dataset, dataset.interactions, config).fit()
        losses[precision] = [record["loss"] for record in trained.history]
    assert losses["bf16"][-1] < losses["bf16"][0] - 0.5, losses
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=0.02)
    assert losses["bf16"] != losses["fp32"]  # and it did run in bfloat16


def test_the_full_softmax_refuses_a_catalogue_too_large_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = cycle_dataset(n_users=20, n_items=120)
    monkeypatch.setattr("models.sequence_task.FULL_SOFTMAX_MAX_ITEMS", 100)
    with pytest.raises(ValueError, match=r"all 120 items at every position.*--negatives mixed"):
        Trainer(dataset, dataset.interactions, sequence_config())
    sampled = sequence_config(negatives="mixed", num_negatives=16, epochs=1)
    assert Trainer(dataset, dataset.interactions, sampled).fit().history  # sampling still trains


def test_tower_config_checks_heads_divide_the_width() -> None:
    with pytest.raises(
        ValueError, match=r"field_dim \(16\) must be a multiple of the attention heads \(3\)"
    ):
        dataclasses.replace(SEQUENCE, heads=3)
    # Only where something attends: the field tower reads no `heads` (it refused 33 for
    # them); its transformer history encoder attends with two heads of its own.
    assert TowerConfig(field_dim=33).field_dim == 33
    with pytest.raises(ValueError, match=r"attention heads \(2\)"):
        TowerConfig(field_dim=33, history_encoder="transformer")


def test_hard_negatives_are_top_ranked_items_the_user_did_not_take() -> None:
    dataset = cycle_dataset(n_users=40)
    config = sequence_config(negatives="mixed", num_negatives=16, hard_negatives=5, epochs=2)
    trainer = Trainer(dataset, dataset.interactions, config)
    trained = trainer.fit()
    task = sequence_task(trainer)
    assert task.hard is not None
    assert task.hard.shape == (task.n_examples, 5)
    assert np.isfinite([r["loss"] for r in trained.history]).all()
    log = task.log
    mined = task.mine_hard_negatives()
    items = item_embeddings(trained)
    for example in range(0, task.n_examples, 7):
        user = task.users[example]
        taken = set(log.items[log.users == user].tolist())
        assert not taken & set(mined[example].tolist())
        latest = torch.from_numpy(task.sequences(np.array([user]))[:, 1:])
        features = task.example_features(torch.tensor([example]))
        with torch.no_grad():
            vector = task.tower.sequence(features, latest)[0, -1]
        scores = vector.numpy() @ items.T
        scores[list(taken)] = -np.inf
        assert set(np.argsort(-scores)[:5].tolist()) == set(mined[example].tolist())
    # And training reads them: with the same draws, a batch's loss is higher with them (more
    # competitors, and strong ones) than without.
    trainer.model.eval()
    batch = np.arange(min(16, task.n_examples))

    def batch_loss() -> float:
        torch.manual_seed(0)
        assert task.sampler is not None
        task.sampler.generator.manual_seed(0)
        with torch.no_grad():
            return float(task.loss(batch))

    task.hard = mined
    with_hard = batch_loss()
    task.hard = None
    assert with_hard > batch_loss() + 1e-4


def test_hard_negatives_never_name_a_taken_item_nor_more_than_the_catalogue() -> None:
    dataset = cycle_dataset(n_users=20, n_items=30)
    too_many = sequence_config(negatives="mixed", num_negatives=8, hard_negatives=31)
    with pytest.raises(ValueError, match=r"hard_negatives \(31\) exceeds the catalogue's 30"):
        Trainer(dataset, dataset.interactions, too_many)  # it crashed in torch's topk
    # As many as the catalogue: past a user's untaken items the rows are -1, never one of
    # the items the user took (which topk returned, scored -inf, as "hard negatives").
    config = sequence_config(negatives="mixed", num_negatives=8, hard_negatives=30, epochs=1)
    trainer = Trainer(dataset, dataset.interactions, config)
    assert np.isfinite([r["loss"] for r in trainer.fit().history]).all()
    task = sequence_task(trainer)
    mined = task.mine_hard_negatives()
    for example, user in enumerate(task.users):
        taken = set(task.log.items[task.log.users == user].tolist())
        row = mined[example].tolist()
        assert not taken & set(row) and row.count(-1) == len(taken)


def test_length_grouping_needs_the_sequence_tower() -> None:
    with pytest.raises(ValueError, match="length_window applies to the sequential"):
        TrainConfig(length_window=50)
    assert TrainConfig(tower=SEQUENCE, length_window=50).length_window == 50


def test_hard_negatives_need_the_sequence_tower_and_sampled_negatives() -> None:
    with pytest.raises(ValueError, match="hard_negatives"):
        TrainConfig(tower=SEQUENCE, negatives="all", hard_negatives=5)
    with pytest.raises(ValueError, match="hard_negatives"):
        TrainConfig(negatives="mixed", hard_negatives=5)

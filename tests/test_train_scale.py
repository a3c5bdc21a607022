"""Training at catalogue scale: row-wise updates of large embedding tables, and a prior search
that embeds once and ranks in chunks."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from helpers_app import free_port
from trainer_helpers import SMALL_SOURCE, fast_config, small_dataset

from models import evaluation, fields
from models.dataset import Dataset
from models.distributed import end_process, join_world, leave_world
from models.evaluation import evaluate_recommender, top_k
from models.optim import EmbeddingAdam
from models.pipeline import run_training
from models.popularity_prior import PRIOR_GRID, PRIOR_HALF_LIVES
from models.recommender import TwoTowerRecommender, top_k_with_bonus
from models.splits import make_split, validation_split
from models.train import Trainer, ValidateFn
from models.trained import TrainedModel
from models.validation import Validator, choose_prior_weight


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize(("n_items", "chunk"), [(40, 10**6), (3000, 3000), (3000, 7 * 3000)])
def test_top_k_with_bonus_is_the_top_k_of_the_full_score_matrix(n_items: int, chunk: int) -> None:
    rng = np.random.default_rng(0)
    users, items = unit_rows(rng, 30, 8), unit_rows(rng, n_items, 8)
    counts = rng.zipf(1.6, n_items).astype(np.float64)
    # No bonus, popularity priors from negligible to dominant, and one that is not >= 0.
    bonuses = [np.zeros(n_items)] + [0.05 * w * np.log1p(counts) for w in (0.5, 2.0, 8.0)]
    bonuses.append(-0.1 * np.log1p(counts))
    seen_rows = np.repeat(np.arange(30), 4)
    seen_cols = rng.integers(0, n_items, len(seen_rows))
    ranked = top_k_with_bonus(users, items, bonuses, 25, (seen_rows, seen_cols), chunk=chunk)
    for bonus, got in zip(bonuses, ranked, strict=True):
        full = users @ items.T + bonus.astype(np.float32)
        full[seen_rows, seen_cols] = -np.inf
        np.testing.assert_array_equal(got, top_k(full, 25))
    assert not set(zip(seen_rows.tolist(), seen_cols.tolist(), strict=True)) & {
        (u, i) for u, row in enumerate(ranked[0].tolist()) for i in row
    }


def reference_validator(dataset: Dataset, fit_part: pd.DataFrame, test: pd.DataFrame) -> ValidateFn:
    """The validation pass as it was: the model as served (prior folded into the item vectors),
    one full-catalogue `evaluate_recommender` per call."""
    item_index = dataset.item_index()

    def validate(trained: TrainedModel) -> dict[str, float]:
        rec = TwoTowerRecommender(trained, dataset.users)
        rec.fit(fit_part, item_index)
        result = evaluate_recommender(rec, fit_part, test, item_index, ks=(10, 50))
        return dict(result.means) | {"pooled_recall@50": result.pooled_recall(50)}

    return validate


def test_prior_search_equals_one_full_validation_pass_per_prior() -> None:
    dataset = small_dataset()
    config = fast_config(epochs=2, validation_fraction=0.1, popularity_prior=1.0, refit=False)
    trained = run_training(dataset, "last-10pct", config, None).trained
    carve = validation_split(make_split(dataset.interactions, "last-10pct").train, 0.1)
    fast = Validator(dataset, carve.train, carve.test, seed=0)
    reference = reference_validator(dataset, carve.train, carve.test)  # every user sampled
    pairs = [(0.0, 0.0)] + [(w, h) for w in PRIOR_GRID if w for h in PRIOR_HALF_LIVES]
    expected = []
    # The same figures up to float rounding: the reference scores with the prior folded into
    # the served vectors, the search adds it to the plain scores, so a near tie may flip.
    for weight, half_life in pairs:
        prior = dataclasses.replace(trained, prior_weight=weight, prior_half_life_days=half_life)
        expected.append(reference(prior))
        assert fast(prior) == pytest.approx(expected[-1], rel=1e-4)
    searched = fast.search(trained, pairs)
    assert len(searched) == len(expected)
    for got, want in zip(searched, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-4)
    # The search itself: the same scores and the same choice as one validation per pair.
    again = dataclasses.replace(trained)
    assert choose_prior_weight(trained, fast, "recall@50") == choose_prior_weight(
        again, reference, "recall@50"
    )
    assert (trained.prior_weight, trained.prior_half_life_days) == (
        again.prior_weight,
        again.prior_half_life_days,
    )


class RecordedScores:
    """Scores item i as -i for everyone; remembers how many users each call scored."""

    def __init__(self, n_items: int) -> None:
        self.row = -np.arange(n_items, dtype=np.float32)
        self.calls: list[int] = []

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        self.calls.append(len(user_ids))
        return np.broadcast_to(self.row, (len(user_ids), self.row.size))


def test_evaluation_scores_a_large_catalogue_a_few_users_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = small_dataset("synthetic:seed=2,users=60,items=40")
    split = make_split(dataset.interactions, "last-10pct")
    index = dataset.item_index()
    whole = RecordedScores(40)
    expected = evaluate_recommender(whole, split.train, split.test, index)
    assert whole.calls == [len(expected.user_ids)]
    monkeypatch.setattr(evaluation, "SCORE_CHUNK", 40 * 3)  # three users' scores at once
    chunked = RecordedScores(40)
    result = evaluate_recommender(chunked, split.train, split.test, index)
    assert max(chunked.calls) == 3 and sum(chunked.calls) == len(expected.user_ids)
    assert result.means == expected.means


def test_large_tables_get_sparse_gradients_and_row_wise_adam(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fields, "SPARSE_ROWS", 100)  # the 201-row item table, not the others
    dataset = small_dataset()
    trainer = Trainer(dataset, dataset.interactions, fast_config(history_length=4))
    tables = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Embedding)]
    sparse = [m for m in tables if m.sparse]
    assert sparse == [trainer.model.item_embedding] and len(tables) > 1
    for decay in (0.0, 0.1):
        model = trainer.model
        before = model.item_embedding.weight.detach().clone()
        optimiser = EmbeddingAdam(model, lr=0.01, weight_decay=decay)
        assert [type(o) for o in optimiser.optimisers] == [torch.optim.Adam, torch.optim.SparseAdam]
        assert optimiser.tables == [model.item_embedding.weight]
        batch = np.arange(8)
        optimiser.zero_grad()
        trainer.task.loss(batch).backward()
        grad = model.item_embedding.weight.grad
        assert grad is not None and grad.is_sparse
        touched = torch.unique(grad.coalesce().indices()[0])
        optimiser.step()
        after = model.item_embedding.weight.detach()
        moved = torch.nonzero((after != before).any(dim=1)).flatten()
        # Exactly the rows the batch looked up (positives, negatives, histories) moved; the
        # padding row is never one of them.
        assert torch.equal(moved, touched) and 0 not in touched.tolist()
        assert 0 < len(touched) < len(before) - 1


@pytest.mark.slow
def test_sparse_tables_validate_like_dense_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lazy Adam on the item table learns as well as dense Adam (here 2000 items, of which a
    batch touches a few hundred)."""
    dataset = small_dataset("synthetic:seed=3,users=400,items=2000")
    config = fast_config(epochs=4, validation_fraction=0.1, popularity_prior=0.0, refit=False)
    dense = run_training(dataset, "last-10pct", config, None)
    monkeypatch.setattr(fields, "SPARSE_ROWS", 1000)
    sparse = run_training(dataset, "last-10pct", config, None)
    assert sparse.trained.model.item_embedding.sparse
    assert not dense.trained.model.item_embedding.sparse
    assert dense.validation is not None and sparse.validation is not None
    for metric in ("pooled_recall@50", "recall@50"):
        assert abs(sparse.validation[metric] - dense.validation[metric]) < 0.05, (
            dense.validation,
            sparse.validation,
        )
    test_recall = [run.results["two_tower"].means["recall@50"] for run in (dense, sparse)]
    assert abs(test_recall[0] - test_recall[1]) < 0.05, test_recall


def _sparse_member(rank: int, port: int, out: Path) -> None:
    """One of two gloo processes training with a sparse item table."""
    os.environ |= {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": "2",
    }
    torch.set_num_threads(1)
    fields.SPARSE_ROWS = 100  # a spawned process: the test's monkeypatch does not reach it
    join_world(torch.device("cpu"))
    dataset = small_dataset(SMALL_SOURCE)
    trainer = Trainer(dataset, dataset.interactions, fast_config(epochs=1, device="cpu"))
    trained = trainer.fit()  # checks that both processes end with the same parameters
    leave_world()
    table = trained.model.item_embedding
    summary = {"sparse": table.sparse, "table": table.weight.detach().sum().item()}
    (out / f"{rank}.json").write_text(json.dumps(summary))
    end_process(0)  # as the command line ends a member (models.distributed.end_process)


@pytest.mark.slow
def test_data_parallel_training_reduces_sparse_gradients(tmp_path: Path) -> None:
    mp.spawn(_sparse_member, args=(free_port(), tmp_path), nprocs=2, join=True)
    first, second = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert first["sparse"] and first == second

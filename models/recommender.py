"""A trained two-tower model as a recommender for the shared evaluation code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models.bundle import verify_bundle
from models.examples import InteractionLog, encode_table
from models.features import HISTORY, FeatureEncoder
from models.train import TrainedModel


class TwoTowerRecommender:
    """Scores the catalogue for users by inner product, as the service's exact index does.

    `fit` takes the interactions known at prediction time: each user's history is their latest
    items there (newest first), exactly what the online store would hold.

    Args:
        trained: the model and its encoders.
        users: the raw user attribute table (indexed by user id).
    """

    name = "two_tower"

    def __init__(self, trained: TrainedModel, users: pd.DataFrame, batch_size: int = 1024):
        self.trained = trained
        self.users = users
        self.batch_size = batch_size
        self._items = trained.item_embeddings()
        self.tower = trained.serving_user_tower()
        self._history: dict[str, np.ndarray] = {}

    def fit(self, train: pd.DataFrame, item_index: dict[str, int]) -> None:
        encoder = self.trained.user_encoder
        if dict(item_index) != dict(encoder.item_index):
            raise ValueError("evaluation catalogue differs from the model's catalogue")
        log = InteractionLog.build(train, encoder.item_index)
        counts = log.item_counts(len(item_index), self.trained.prior_half_life_days)
        self._items = self.trained.serving_item_matrix(counts)
        histories = log.user_histories(encoder.history_length)
        self._history = dict(zip(log.user_ids, histories, strict=True))

    @property
    def known_users(self) -> list[str]:
        """Users with a history in the interactions given to `fit`."""
        return list(self._history)

    def user_inputs(self, user_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """The user tower's encoded inputs for `user_ids` (attributes + history)."""
        encoder = self.trained.user_encoder
        feats = encode_table(encoder, self.users, user_ids)
        if encoder.history_length:
            empty = np.zeros(encoder.history_length, dtype=np.int64)
            hist = [self._history.get(u, empty) for u in user_ids]
            feats[HISTORY] = torch.from_numpy(np.stack(hist) if hist else empty[None, :0])
        return feats

    @torch.no_grad()
    def user_embeddings(self, user_ids: Sequence[str]) -> np.ndarray:
        """float32 `(len(user_ids), out_dim)`."""
        tower = self.tower.eval()
        device = next(tower.parameters()).device
        out = []
        for start in range(0, len(user_ids), self.batch_size):
            feats = self.user_inputs(list(user_ids[start : start + self.batch_size]))
            out.append(tower({k: v.to(device) for k, v in feats.items()}).cpu())
        return torch.cat(out).numpy() if out else self._items[:0]

    @property
    def item_matrix(self) -> np.ndarray:
        """The vectors the service indexes, `(n_items, dim)` (prior column included)."""
        return self._items

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        return self.user_embeddings(user_ids) @ self._items.T


class BundleRecommender:
    """An exported bundle as a recommender, encoding raw attributes exactly as the service does.

    Args:
        path: a bundle version directory (verified on load).
        users: the raw user attribute table.
        item_index: the evaluation catalogue; bundle items outside it are ignored and
            catalogue items outside the bundle score -inf.
    """

    name = "two_tower"

    def __init__(self, path: Path, users: pd.DataFrame, item_index: Mapping[str, int]):
        verified = verify_bundle(path)
        self.manifest = verified.manifest
        self.tower = torch.jit.load(str(verified.user_tower_path))
        self.encoder = FeatureEncoder.from_json(
            verified.feature_spec, {item: i for i, item in enumerate(verified.item_ids)}
        )
        self.users = users
        self.n_items = len(item_index)
        rows = [(item_index[i], r) for r, i in enumerate(verified.item_ids) if i in item_index]
        self._columns = np.array([c for c, _ in rows], dtype=np.int64)
        self._embeddings = verified.item_embeddings[[r for _, r in rows]]
        self._history: dict[str, list[str]] = {}

    def fit(self, train: pd.DataFrame, item_index: Mapping[str, int]) -> None:
        ordered = train.sort_values("timestamp", kind="stable")
        length, known = self.encoder.history_length, self.encoder.item_index
        grouped = ordered.groupby("user_id", sort=False)["item_id"]
        # Items the bundle does not know are dropped before the history is cut to length, as
        # the encoder does and training did.
        self._history = {
            str(u): [i for i in s.iloc[::-1] if i in known][:length] for u, s in grouped
        }

    @torch.no_grad()
    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        table = self.users.reindex(pd.Index(list(user_ids)))
        rows = [{str(k): v for k, v in row.items()} for row in table.to_dict("records")]
        histories = [self._history.get(u, []) for u in user_ids]
        inputs = self.encoder.encode(rows, histories)
        users = self.tower({k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
        scores = np.full((len(user_ids), self.n_items), -np.inf, dtype=np.float32)
        scores[:, self._columns] = users @ self._embeddings.T
        return scores

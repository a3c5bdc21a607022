"""A trained two-tower model as a recommender for the shared evaluation code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from models.baselines import UserItems
from models.bundle import verify_bundle
from models.evaluation import SCORE_CHUNK
from models.examples import InteractionLog, encode_table
from models.features import HISTORY, FeatureEncoder
from models.popularity_prior import item_prior, serving_item_matrix, serving_user_tower
from models.tower_format import load_towers
from models.trained import TrainedModel, item_embeddings

# Items each user keeps by inner product alone when ranking under several bonuses
# (`top_k_with_bonus`); more of them prune more of the rest, at a larger union to rank.
INNER_PRODUCT_CANDIDATES = 256
# Slack on the pruning bound: an item whose rounded score could tie the k-th is ranked too.
_BOUND_SLACK = 1e-5


@torch.no_grad()
# Over 60 lines with its docstring, which states the bound the loop relies on; the body is 32.
def top_k_with_bonus(
    users: np.ndarray,
    items: np.ndarray,
    bonuses: Sequence[np.ndarray],
    k: int,
    seen: tuple[np.ndarray, np.ndarray] | None = None,
    chunk: int = SCORE_CHUNK,
) -> list[np.ndarray]:
    """Each user's `k` best items by `users @ items.T + bonus`, best first, for every bonus.

    The inner products of a chunk of users are computed once for all the bonuses (a
    popularity prior's `b` per (weight, half-life)), and under each bonus only the items that
    can still reach a user's top k are ranked: with L a lower bound of the user's k-th best
    score and c the inner product of their `INNER_PRODUCT_CANDIDATES`-th best item, an item
    outside those candidates scores at most c + its bonus, so only the items whose bonus is
    at least L - c join them (a prefix of the items by bonus). The result is the top k of
    the full score matrix, ties aside, which is never held more than one chunk at a time.

    Args:
        users: float32 `(U, D)`.
        items: float32 `(N, D)`.
        bonuses: float `(N,)` each, added to every user's scores.
        k: list length (clipped to N).
        seen: `(user rows, item rows)` of the pairs to leave out (score -inf), as
            `UserItems.coords` gives them.
        chunk: scores held at once (the users of a chunk x N).

    Returns:
        int64 `(U, min(k, N))` item rows per bonus.

    Example:
        >>> top_k_with_bonus(users, items, [np.zeros(len(items))], 10)[0].shape  # (U, 10)
    """
    n_items = len(items)
    k = min(k, n_items)
    width = min(max(INNER_PRODUCT_CANDIDATES, k), n_items)
    item_t = torch.from_numpy(np.ascontiguousarray(items, dtype=np.float32))
    bonus_t = [torch.as_tensor(np.asarray(b, dtype=np.float32)) for b in bonuses]
    by_bonus = [torch.argsort(b, descending=True, stable=True) for b in bonus_t]
    ascending = [b.double().sort().values for b in bonus_t]
    seen_rows, seen_cols = seen if seen is not None else (np.empty(0, np.int64),) * 2
    out = [np.empty((len(users), k), dtype=np.int64) for _ in bonuses]
    step = max(1, chunk // max(n_items, 1))
    for lo in range(0, len(users), step):
        hi = min(lo + step, len(users))
        scores = torch.from_numpy(np.ascontiguousarray(users[lo:hi], dtype=np.float32)) @ item_t.T
        mine = (seen_rows >= lo) & (seen_rows < hi)
        scores[seen_rows[mine] - lo, seen_cols[mine]] = -torch.inf
        near, candidates = torch.topk(scores, width, dim=1)
        floor = near[:, -1].double()
        for bonus, order, sorted_bonus, result in zip(
            bonus_t, by_bonus, ascending, out, strict=True
        ):
            popular = order[:k]
            bound = torch.maximum(
                torch.topk(near + bonus[candidates], k, dim=1).values[:, -1],
                torch.topk(scores[:, popular] + bonus[popular], k, dim=1).values[:, -1],
            ).double()
            # Every item outside the candidates is seen (-inf) when the floor is -inf.
            need = torch.where(floor > -torch.inf, bound - floor - _BOUND_SLACK, torch.inf)
            extra = n_items - int(torch.searchsorted(sorted_bonus, need).min())
            columns = torch.unique(torch.cat([candidates.flatten(), order[:extra]]))
            ranked = scores[:, columns] + bonus[columns]
            result[lo:hi] = columns[torch.topk(ranked, k, dim=1).indices].numpy()
    return out


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
        self._embeddings = item_embeddings(trained)
        self._items = self._embeddings
        self.tower = serving_user_tower(trained)
        self._history: dict[str, np.ndarray] = {}
        self._log: InteractionLog | None = None

    def fit(self, train: pd.DataFrame, item_index: dict[str, int]) -> None:
        encoder = self.trained.user_encoder
        if dict(item_index) != dict(encoder.item_index):
            raise ValueError("evaluation catalogue differs from the model's catalogue")
        log = InteractionLog.build(train, encoder.item_index)
        counts = log.item_counts(len(item_index), self.trained.prior_half_life_days)
        self._items = serving_item_matrix(self.trained, counts, self._embeddings)
        histories = log.user_histories(encoder.history_length)
        self._history = dict(zip(log.user_ids, histories, strict=True))
        self._log = log

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

    def user_embeddings(self, user_ids: Sequence[str]) -> np.ndarray:
        """float32 `(len(user_ids), out_dim)`."""
        return self._encode(self.tower, user_ids, self._items)

    @torch.no_grad()
    def _encode(self, tower: nn.Module, user_ids: Sequence[str], items: np.ndarray) -> np.ndarray:
        """`tower`'s vectors of `user_ids`, as wide as `items`' rows."""
        tower = tower.eval()
        device = next(tower.parameters()).device
        out = []
        for start in range(0, len(user_ids), self.batch_size):
            feats = self.user_inputs(list(user_ids[start : start + self.batch_size]))
            out.append(tower({k: v.to(device) for k, v in feats.items()}).cpu())
        return torch.cat(out).numpy() if out else items[:0]

    @property
    def item_matrix(self) -> np.ndarray:
        """The vectors the service indexes, `(n_items, dim)` (prior column included)."""
        return self._items

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        return self.user_embeddings(user_ids) @ self._items.T

    def top_k_under_priors(
        self,
        user_ids: Sequence[str],
        priors: Sequence[tuple[float, float]],
        k: int,
        seen: UserItems | None = None,
    ) -> list[np.ndarray]:
        """Each user's `k` best catalogue rows, best first, under each popularity prior: the
        ranking of `score` with that prior folded in (by `u.v + b`), for every prior at the
        cost of embedding the users and items once (`top_k_with_bonus`).

        Args:
            user_ids: users to rank for (histories from `fit`).
            priors: `(weight, half-life days)` pairs, as `TrainedModel.prior_weight` and
                `TrainedModel.prior_half_life_days`, counted on the interactions of `fit`.
            k: list length.
            seen: items left out of each user's list (`evaluate_recommender`'s exclusion).

        Returns:
            int64 `(len(user_ids), min(k, n_items))` per prior.
        """
        if self._log is None:
            raise RuntimeError("top_k_under_priors needs fit() first")
        users = self._encode(self.trained.model.user_tower, user_ids, self._embeddings)
        n_items = len(self._embeddings)
        counts = {h: self._log.item_counts(n_items, h) for h in {h for _, h in priors}}
        bonuses = [item_prior(self.trained, counts[h], weight) for weight, h in priors]
        coords = seen.coords(user_ids) if seen is not None else None
        return top_k_with_bonus(users, self._embeddings, bonuses, k, coords)


class BundleRecommender:
    """An exported bundle as a recommender, encoding raw attributes exactly as the service does.

    Args:
        path: a bundle version directory (verified on load).
        users: the raw user attribute table.
        item_index: the evaluation catalogue; bundle items outside it are ignored and
            catalogue items outside the bundle score -inf.
        history_cap: the service's `HISTORY_CAP`: the tower reads at most this many of a
            user's newest items (None: all it was trained to read).
    """

    name = "two_tower"

    def __init__(
        self,
        path: Path,
        users: pd.DataFrame,
        item_index: Mapping[str, int],
        history_cap: int | None = None,
    ):
        verified = verify_bundle(path)
        self.manifest = verified.manifest
        self.tower = load_towers(verified.path, verified.manifest).user
        self.encoder = FeatureEncoder.from_json(
            verified.feature_spec, {item: i for i, item in enumerate(verified.item_ids)}
        )
        self.users = users
        self.n_items = len(item_index)
        rows = [(item_index[i], r) for r, i in enumerate(verified.item_ids) if i in item_index]
        self._columns = np.array([c for c, _ in rows], dtype=np.int64)
        self._embeddings = verified.item_embeddings[[r for _, r in rows]]
        self.history_cap = history_cap
        self._history_rows: dict[str, list[int]] = {}

    def fit(self, train: pd.DataFrame, item_index: Mapping[str, int]) -> None:
        ordered = train.sort_values("timestamp", kind="stable")
        grouped = ordered.groupby("user_id", sort=False)["item_id"]
        # What the service reads (`app.retrieval.Query.prepare`, the same call): the known
        # items among the newest `history_cap` ids (HISTORY_CAP) the store holds.
        newest_rows, cap = self.encoder.newest_rows, self.history_cap
        self._history_rows = {str(u): newest_rows(list(s.iloc[::-1][:cap]))[0] for u, s in grouped}

    @torch.no_grad()
    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        table = self.users.reindex(pd.Index(list(user_ids)))
        rows = [{str(k): v for k, v in row.items()} for row in table.to_dict("records")]
        history_rows = [self._history_rows.get(u, []) for u in user_ids]
        inputs = self.encoder.encode(rows, history_rows=history_rows)
        users = self.tower({k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
        scores = np.full((len(user_ids), self.n_items), -np.inf, dtype=np.float32)
        scores[:, self._columns] = users @ self._embeddings.T
        return scores

"""Knowledge distillation from an EASE teacher into the two-tower (small catalogues).

EASE (`models.baselines.EASE`) ranks the catalogue for each training user from their whole
training history; the two-tower's user tower reads only the latest items. Beside its own
softmax objective, the student is trained to match the teacher's distribution over the items
the user has not interacted with (its `top_k` best, softmax of their per-user standardised
scores / `temperature`). Nothing of the teacher is exported: the student stays a two-tower
(the user tower, precomputed item vectors, inner-product search).

The teacher is a dense `n_items x n_items` matrix (O(n_items^3) to fit), and the student's
side of the loss scores the whole catalogue every step: meant for catalogues of a few
thousand items, like `negatives="all"`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.baselines import EASE, UserItems, check_dense_fits
from models.examples import InteractionLog


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's soft targets and each user's own items, by user row of the log.

    Attributes:
        items: int64 `(n_users, K)` catalogue rows, the teacher's best unseen items.
        probs: float32 `(n_users, K)`, each row sums to 1 (0 for a user who took every item).
        seen: the users' training items (rows in log order), masked out of the student.
    """

    items: Tensor
    probs: Tensor
    seen: UserItems

    def seen_mask(self, users: np.ndarray) -> Tensor:
        """bool `(B, n_items)`: True where the example's user has the item in training."""
        ids = [str(u) for u in users]
        rows, cols = self.seen.coords(ids)
        mask = torch.zeros(len(ids), self.seen.n_items, dtype=torch.bool)
        mask[torch.from_numpy(rows), torch.from_numpy(cols)] = True
        return mask


def ease_targets(
    log: InteractionLog,
    n_items: int,
    top_k: int = 100,
    temperature: float = 1.0,
    l2: float = 500.0,
    chunk: int = 1024,
) -> TeacherTargets:
    """Fit EASE on the log and keep each user's `top_k` unseen items as soft targets.

    Args:
        log: the training interactions (catalogue rows).
        n_items: catalogue size.
        top_k: targets kept per user.
        temperature: softmax temperature on the per-user standardised teacher scores.
        l2: EASE's ridge penalty.
        chunk: users scored at a time.
    """
    check_dense_fits(n_items, "distillation's EASE teacher")
    frame = pd.DataFrame({"user_id": log.users.astype(str), "item_id": log.items.astype(str)})
    item_index = {str(r): r for r in range(n_items)}
    teacher = EASE(l2)
    teacher.fit(frame, item_index)
    seen = UserItems.build(frame, item_index)
    users = [str(u) for u in range(len(log.user_ids))]
    top_k = min(top_k, n_items)
    items = np.zeros((len(users), top_k), dtype=np.int64)
    probs = np.zeros((len(users), top_k), dtype=np.float32)
    for lo in range(0, len(users), chunk):
        batch = users[lo : lo + chunk]
        scores = teacher.score(batch).astype(np.float64)
        unseen = np.ones(scores.shape, dtype=bool)
        unseen[seen.coords(batch)] = False
        n_unseen = np.maximum(unseen.sum(axis=1, keepdims=True), 1)
        mean = np.where(unseen, scores, 0.0).sum(axis=1, keepdims=True) / n_unseen
        spread = np.where(unseen, scores - mean, 0.0)
        std = np.sqrt((spread**2).sum(axis=1, keepdims=True) / n_unseen) + 1e-12
        z = np.where(unseen, (scores - mean) / std, -np.inf)
        top = np.argpartition(-z, top_k - 1, axis=1)[:, :top_k]
        logits = np.take_along_axis(z, top, axis=1) / temperature
        peak = logits.max(axis=1, keepdims=True)
        # A user who took every item has no target: all-zero probabilities (no loss), not NaN.
        weights = np.exp(logits - np.where(np.isfinite(peak), peak, 0.0))
        total = weights.sum(axis=1, keepdims=True)
        items[lo : lo + len(batch)] = top
        probs[lo : lo + len(batch)] = np.divide(
            weights, total, out=np.zeros_like(weights), where=total > 0
        )
    return TeacherTargets(torch.from_numpy(items), torch.from_numpy(probs), seen)


class DistillationLoss(nn.Module):
    """Cross-entropy of the student's catalogue softmax against the teacher's soft targets.

    Shapes: logits `(B, n_items)` with the users' own items masked to -inf beforehand,
    target items `(B, K)` int64, target probabilities `(B, K)` (rows summing to 1).
    """

    def forward(self, logits: Tensor, items: Tensor, probs: Tensor) -> Tensor:
        log_probs = F.log_softmax(logits, dim=1).gather(1, items)
        return -(probs * log_probs).sum(1).mean()

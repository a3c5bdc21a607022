"""The sequential objective: every position of a user's sequence predicts the next item.

One example is one user: their latest `history_length + 1` training items, oldest first. The
sequential user tower (`models.sequence_tower`) reads the first `history_length` of them
under a causal mask, so position t sees items 1..t and is trained to score item t + 1 above
the rest of the catalogue. That is how SASRec-family models train, and it gives every batch
`history_length` times more targets than one example per interaction with a pooled history.

The softmax runs over the whole catalogue where it fits (`negatives="all"`: exact, no sampling
bias); beyond it, over the targets' own items against shared sampled negatives, with logQ
correction and accidental hits masked.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.examples import gather
from models.losses import full_softmax_cross_entropy
from models.samplers import in_batch_log_q, negative_sampler, proposal_log_q
from models.sequence_tower import SequenceUserTower
from models.task import ItemRows, TrainingData
from models.towers import TwoTower
from models.train_config import TrainConfig

# The full softmax scores every item at every position of a batch (64 users x 200 positions x
# the catalogue), twice a step: past this many items that costs more than it is worth; sample
# negatives instead.
FULL_SOFTMAX_MAX_ITEMS = 100_000


class SequenceTask:
    """Batches of users -> the next-item loss of the sequential tower.

    Args:
        model: a `TwoTower` whose user tower is a `SequenceUserTower`.
        data: the encoded training data.
        config: the run's settings (history length, negatives, logQ, hard negatives).
        generator: torch generator of the sampled negatives' draws.
        device: where the model lives.
    """

    def __init__(
        self,
        model: TwoTower,
        data: TrainingData,
        config: TrainConfig,
        generator: torch.Generator,
        device: torch.device,
    ) -> None:
        self.model, self.log, self.config, self.device = model, data.log, config, device
        if not isinstance(model.user_tower, SequenceUserTower):
            raise TypeError("the sequential objective trains a SequenceUserTower")
        if config.negatives == "all" and data.n_items > FULL_SOFTMAX_MAX_ITEMS:
            raise ValueError(
                f"the full softmax (negatives 'all', the sequential tower's default) would "
                f"score all {data.n_items} items at every position of every batch (at most "
                f"{FULL_SOFTMAX_MAX_ITEMS}): sample them, e.g. --negatives mixed"
            )
        self.tower = model.user_tower
        self.items = ItemRows(model, data, device)
        self.sampler = negative_sampler(
            config.negatives, self.log.item_counts(data.n_items), generator
        )
        log = self.log
        sizes = log.user_end - log.user_start[log.user_end - 1] if len(log.user_end) else []
        # Users with a next item to predict: two training items at least.
        self.users = np.flatnonzero(np.asarray(sizes) >= 2)
        ends = log.user_end[self.users]
        # Each user's sequence length (its latest history_length + 1 items at most).
        self.lengths = np.minimum(ends - log.user_start[ends - 1], config.history_length + 1)
        # Every example's sequence and encoded attributes, held where the model is: a batch
        # is gathered there, with no per-batch assembly on the CPU and copy to a GPU.
        # int32: half the memory of the row indices (20,000 users x 101 items: 8 MB).
        self.examples = torch.from_numpy(self.sequences(self.users).astype(np.int32)).to(device)
        # The in-batch candidates are the batches' positives: each sequence's items after its
        # first, once an epoch (not the whole log: a user's items older than the sequence are
        # never predicted).
        targets = self.examples[:, 1:][self.examples[:, :-1] > 0].long() - 1
        counts = torch.bincount(targets, minlength=data.n_items).cpu().numpy()
        self.log_q = proposal_log_q(config.negatives, in_batch_log_q(counts), self.sampler)
        self.log_q = self.log_q.to(device)
        rows = torch.from_numpy(self.users)
        self.features = {k: v.to(device) for k, v in gather(data.user_table, rows).items()}
        # Positions (next-item predictions) in a batch on average: grouped batches hold
        # unequal numbers of them, and each weighs its loss by its own over this.
        n_batches = max(1, -(-len(self.users) // config.batch_size))
        self.mean_positions = float((self.lengths - 1).sum()) / n_batches
        if config.hard_negatives > data.n_items:
            raise ValueError(
                f"hard_negatives ({config.hard_negatives}) exceeds the catalogue's "
                f"{data.n_items} items"
            )
        # (n_examples, hard_negatives) rows, per epoch; -1 where a user has too few untaken
        self.hard: Tensor | None = None

    def start_epoch(self) -> None:
        """Refresh the hard negatives (if any) with the model as it is now."""
        if self.config.hard_negatives:
            self.hard = self.mine_hard_negatives()

    @torch.no_grad()
    def mine_hard_negatives(self, chunk: int = 512) -> Tensor:
        """`(n_examples, hard_negatives)` rows: for each user, the items the current model
        ranks highest after their latest training items, among those they did not take (-1
        past the last of those: a user who took nearly the whole catalogue)."""
        training = self.model.training
        self.model.eval()
        items = self.items(self.items.all_rows)
        hard = []
        for lo in range(0, len(self.users), chunk):
            users = self.users[lo : lo + chunk]
            examples = torch.arange(lo, lo + len(users), device=self.device)
            newest_first = self.examples[examples, 1:].long().flip(1)
            scores = self.tower.newest(self.example_features(examples), newest_first) @ items.T
            ends = self.log.user_end[users]
            starts = self.log.user_start[ends - 1]
            owner = np.repeat(np.arange(len(users)), ends - starts)
            events = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends, strict=True)])
            taken = torch.from_numpy(self.log.items[events]).to(self.device)
            scores[torch.from_numpy(owner).to(self.device), taken] = -torch.inf
            top = scores.topk(self.config.hard_negatives, dim=1)
            hard.append(top.indices.masked_fill(top.values == -torch.inf, -1))
        self.model.train(training)
        return torch.cat(hard)

    def example_features(self, examples: Tensor) -> dict[str, Tensor]:
        """The encoded attributes of the users of `examples` (indices on the model's device)."""
        return gather(self.features, examples)

    @property
    def n_examples(self) -> int:
        return len(self.users)

    def sequences(self, users: np.ndarray) -> np.ndarray:
        """`(B, history_length + 1)` item indices (row + 1) of each user's latest training
        items, oldest first, left-padded with 0."""
        ends = self.log.user_end[users]
        starts = self.log.user_start[ends - 1]
        newest_first = self.log.histories(ends, starts, self.config.history_length + 1)
        return np.ascontiguousarray(newest_first[:, ::-1])

    def epoch_order(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """A random order of the examples. With `length_window` W, each run of `batch_size`
        holds users of similar history length, so a batch pads little (`loss` drops the
        columns that are padding for the whole batch): users are shuffled, sorted by length
        within windows of W batches, cut into batches, and the batches shuffled. On ML-1M
        (2,999 users, 64 a batch) a window of 50 batches held every user, so the same users
        met in the same batch every epoch; a plain shuffle (W = 0) validated better."""
        order = rng.permutation(len(self.users))
        windows = self.config.length_window
        if not windows:
            return order
        window = batch_size * windows
        for lo in range(0, len(order), window):
            chunk = order[lo : lo + window]
            order[lo : lo + window] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
        batches = [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]
        return np.concatenate([batches[i] for i in rng.permutation(len(batches))])

    def loss(self, batch: np.ndarray) -> Tensor:
        """Mean next-item cross-entropy over every position of the batch's sequences."""
        examples = torch.from_numpy(batch).to(self.device)
        # Columns that are padding for every user in the batch predict nothing and feed no
        # position (positions count from the newest item): only the longest sequence's
        # width is gathered. The lengths are on the CPU, so the GPU is never waited for.
        width = int(self.lengths[batch].max())
        seqs = self.examples[examples, self.examples.shape[1] - width :].long()
        inputs, targets = seqs[:, :-1], seqs[:, 1:]
        outputs = self.tower.sequence(self.example_features(examples), inputs)
        wanted = inputs > 0  # a padding position has nothing to predict from
        hard = None
        if self.hard is not None:  # each user's hard negatives, for each of their positions
            hard = self.hard[examples].unsqueeze(1).expand(-1, inputs.shape[1], -1)[wanted]
        loss = self._softmax(outputs[wanted], targets[wanted] - 1, hard)
        if self.config.length_window:
            # A batch of short sequences must not weigh as much as one of long ones: the
            # epoch's objective stays the mean over positions, as with a plain shuffle.
            loss = loss * (float((self.lengths[batch] - 1).sum()) / self.mean_positions)
        return loss

    def _softmax(self, users: Tensor, targets: Tensor, hard: Tensor | None = None) -> Tensor:
        """Cross-entropy of `(N, D)` user vectors against their `(N,)` target rows: over the
        whole catalogue, or the target against the shared negatives, each logit less its
        log q under the proposal (Bengio & Senecal's sampled softmax), and each position's
        `(N, H)` hard negatives, not sampled and so not corrected."""
        logits = self.model.logits
        if self.config.negatives == "all":
            # The temperature divides the (N, D) user vectors, not the (N, catalogue) logits.
            return full_softmax_cross_entropy(
                logits(users), self.items(self.items.all_rows), targets
            )
        negatives = self._negatives(targets)
        positives = self.items(targets)
        pos_logits = logits((users * positives).sum(-1, keepdim=True))
        neg_logits = logits(users @ self.items(negatives).T)
        if self.config.logq_correction:
            pos_logits = pos_logits - self.log_q[targets].unsqueeze(1)
            neg_logits = neg_logits - self.log_q[negatives].unsqueeze(0)
        hits = targets.unsqueeze(1) == negatives.unsqueeze(0)  # accidental hits
        columns = [pos_logits, masked_lowest(neg_logits, hits)]
        if hard is not None:
            vectors = self.items(hard.clamp(min=0).flatten()).view(*hard.shape, -1)
            hard_logits = logits(torch.einsum("nd,nhd->nh", users, vectors))
            taken = (hard == targets.unsqueeze(1)) | (hard < 0)
            columns.append(masked_lowest(hard_logits, taken))
        return F.cross_entropy(torch.cat(columns, dim=1), torch.zeros_like(targets))

    def _negatives(self, targets: Tensor) -> Tensor:
        """`num_negatives` rows shared by every position: the batch's own targets
        (`in-batch`), sampled ones (`uniform`, `popularity`), or half of each (`mixed`)."""
        k = self.config.softmax_negatives
        picks = targets[torch.randint(len(targets), (k,), device=targets.device)]
        if self.sampler is None:
            return picks
        rows = self.sampler.sample(k)[0].to(self.device)
        if self.config.negatives == "mixed":
            return torch.cat([picks[: k // 2], rows[k // 2 :]])
        return rows


def masked_lowest(logits: Tensor, mask: Tensor) -> Tensor:
    """`logits` with the `mask`ed cells at the lowest finite value of their dtype (bfloat16's
    under mixed precision): out of the softmax, yet never -inf."""
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)

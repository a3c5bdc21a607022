"""A model hook that has the store read as much of each user's history as the model reads."""

from __future__ import annotations

import logging

from app.model.serving_model import ServingModel
from app.store import FeatureStore

log = logging.getLogger(__name__)


class HistoryReads:
    """Sets the store's history read to what the serving model's user tower reads, at the swap
    (a 50-item tower fetches, maps and excludes 50 items, a 200-item one 200), and warns, once
    per loaded model, when the tower reads more than HISTORY_CAP keeps: it would then see only
    the newest HISTORY_CAP items, not what it was trained and validated on. It still serves
    (a shorter read is also a way to serve faster); the warning names the setting that fixes
    it, the command that measures what the shorter read costs and the training option that
    makes a shorter read the bundle's own."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store

    async def prepare(self, model: ServingModel) -> ServingModel:
        reads, cap = model.encoder.history_length, self.store.history_cap
        if reads > cap:
            log.warning(
                "bundle %s reads the newest %d history items but HISTORY_CAP keeps %d: stored "
                "histories give it %d at most; set HISTORY_CAP=%d (and publish-features "
                "--history-length %d), unless the shorter read is meant (`python -m models "
                "evaluate --history-cap %d` measures its cost in quality; `train "
                "--serve-history-length %d` makes it the bundle's own)",
                model.version,
                reads,
                cap,
                cap,
                reads,
                reads,
                cap,
                cap,
            )
        return model

    def rebase(self, model: ServingModel) -> ServingModel:
        # A model with no history feature reads none, but the seen items still come from it.
        self.store.read_history(model.encoder.history_length or self.store.history_cap)
        return model

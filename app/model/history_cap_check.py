"""A model hook that warns when the user tower reads more history than HISTORY_CAP keeps."""

from __future__ import annotations

import logging

from app.model.serving_model import ServingModel
from app.store import FeatureStore

log = logging.getLogger(__name__)


class HistoryCapCheck:
    """Warns, once per loaded model, when its user tower reads more than HISTORY_CAP keeps: it
    would then see only the newest HISTORY_CAP items, not what it was trained and validated
    on. It still serves (a shorter read is also a way to serve faster); the warning names the
    setting that fixes it, the command that measures what the shorter read costs and, for the
    sequential tower, the training option that makes a shorter read the bundle's own. (A tower
    that reads fewer items than are stored takes the newest it needs; every stored item is
    still excluded.)"""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store

    async def prepare(self, model: ServingModel) -> ServingModel:
        reads, cap = model.encoder.history_length, self.store.history_cap
        if reads > cap:
            # Only the sequential tower can be trained to read fewer than it trained on.
            # (The manifest's training record: informational, so not verified at load.)
            record = model.manifest.get("model")
            sequential = isinstance(record, dict) and record.get("user_tower") == "sequence"
            own = f"; `train --serve-history-length {cap}` makes it the bundle's own"
            log.warning(
                "bundle %s reads the newest %d history items but HISTORY_CAP keeps %d: stored "
                "histories give it %d at most; set HISTORY_CAP=%d (and publish-features "
                "--history-length %d), unless the shorter read is meant (`python -m models "
                "evaluate --history-cap %d` measures its cost in quality%s)",
                model.version,
                reads,
                cap,
                cap,
                reads,
                reads,
                cap,
                own if sequential else "",
            )
        return model

    def rebase(self, model: ServingModel) -> ServingModel:
        return model

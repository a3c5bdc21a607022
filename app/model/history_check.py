"""A model hook that says when the store keeps fewer history items than the model reads."""

from __future__ import annotations

import logging

from app.model.serving_model import ServingModel

log = logging.getLogger(__name__)


class HistoryCapCheck:
    """Warns, once per loaded model, when its user tower reads more of a user's history than
    HISTORY_CAP keeps: it would then see only the newest HISTORY_CAP items, not what it was
    trained and validated on (the store trims and reads the stored list to the cap). It still
    serves; the warning names the setting that fixes it."""

    def __init__(self, history_cap: int) -> None:
        self.history_cap = history_cap

    async def prepare(self, model: ServingModel) -> ServingModel:
        reads = model.encoder.history_length
        if reads > self.history_cap:
            log.warning(
                "bundle %s reads the newest %d history items but HISTORY_CAP keeps %d: stored "
                "histories give it %d at most; set HISTORY_CAP=%d (and publish-features "
                "--history-length %d)",
                model.version,
                reads,
                self.history_cap,
                self.history_cap,
                reads,
                reads,
            )
        return model

    def rebase(self, model: ServingModel) -> ServingModel:
        return model

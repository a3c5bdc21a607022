"""`UserService`: writes of user events and features to the online store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app.errors import InvalidInput, too_long
from app.feature_checks import feature_errors
from app.model import ModelRepository
from app.store import FeatureStore


class UserService:
    """Args:
    store: online user state (writes raise FeatureStoreUnavailable -> 503).
    repository: the serving model's feature spec validates feature names and value types.
    max_events: most item ids accepted in one events call.
    """

    def __init__(self, store: FeatureStore, repository: ModelRepository, max_events: int) -> None:
        self.store = store
        self.repository = repository
        self.max_events = max_events

    async def append_events(self, user_id: str, item_ids: Sequence[str]) -> int:
        """Returns the stored history length. Item ids are not checked against the catalogue:
        it changes with every model version, and recall ignores unknown ones."""
        if len(item_ids) > self.max_events:
            raise InvalidInput([too_long(("body", "item_ids"), self.max_events, len(item_ids))])
        return await self.store.append_events(user_id, item_ids)

    async def put_features(self, user_id: str, features: Mapping[str, Any]) -> list[str]:
        """Replace the user's features; names and value types are checked against the serving
        model's spec.

        With no model loaded there is no spec to check against: the features are stored as
        given (ingestion must not stop while a model is missing; recall ignores names the
        model does not know)."""
        model = self.repository.current
        if model is not None:
            errors = feature_errors(model, features, ("body", "features"))
            if errors:
                raise InvalidInput(errors)
        await self.store.put_features(user_id, features)
        return sorted(features)

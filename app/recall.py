"""`RecallService`: request -> stored state -> prepared queries -> retrieve -> response."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anyio.to_thread

from app.bundle_loader import ServingBundle
from app.errors import FeatureStoreUnavailable, InvalidInput, input_error
from app.feature_store import EMPTY, FeatureStore, UserRecord
from app.metrics import Metrics
from app.repository import ModelRepository
from app.retrieval import Query, Result, retrieve
from app.schemas import FeatureSource, RecallRequest, RecallResponse

log = logging.getLogger(__name__)

Loc = tuple[str | int, ...]
# A single query on a small flat index (or any approximate one) takes ~0.3 ms: cheaper inline
# than a hop to the thread pool (~0.15 ms). Batches and big exact searches go to a thread so
# the event loop keeps serving meanwhile.
INLINE_MAX_FLAT_ITEMS = 50_000


@dataclass(frozen=True)
class Limits:
    max_k: int
    max_history: int
    max_batch: int


class RecallService:
    """Args:
    repository: source of the serving bundle (read once per call).
    store: online user state.
    limits: run-time request bounds.
    metrics: stage timings and feature-source counts.
    """

    def __init__(
        self, repository: ModelRepository, store: FeatureStore, limits: Limits, metrics: Metrics
    ) -> None:
        self.repository = repository
        self.store = store
        self.limits = limits
        self.metrics = metrics

    async def recall(self, request: RecallRequest) -> RecallResponse:
        return (await self._recall([request], [("body",)]))[0]

    async def recall_batch(self, requests: Sequence[RecallRequest]) -> list[RecallResponse]:
        if len(requests) > self.limits.max_batch:
            msg = f"List should have at most {self.limits.max_batch} items"
            raise InvalidInput([input_error(("body", "requests"), msg, len(requests), "too_long")])
        return await self._recall(requests, [("body", "requests", i) for i in range(len(requests))])

    async def _recall(
        self, requests: Sequence[RecallRequest], locs: Sequence[Loc]
    ) -> list[RecallResponse]:
        self._check_limits(requests, locs)
        bundle = self.repository.require()  # read once: the whole call uses this version
        self._check_feature_names(bundle, requests, locs)
        stored = await self._fetch(bundle, requests)
        prepared = [self._prepare(bundle, r, stored.get(r.user_id)) for r in requests]
        queries = [query for query, _ in prepared]
        results = await self._retrieve(bundle, queries)
        responses = []
        for request, (_, source), items in zip(requests, prepared, results, strict=True):
            self.metrics.feature_source.labels(source).inc()
            # Plain data validated in one pass: twice as fast as building ScoredItem objects.
            response = {
                "user_id": request.user_id,
                "model_version": bundle.version,
                "items": [{"item_id": item, "score": score} for item, score in items],
                "feature_source": source,
            }
            responses.append(RecallResponse.model_validate(response))
        return responses

    def _check_limits(self, requests: Sequence[RecallRequest], locs: Sequence[Loc]) -> None:
        max_k, max_history = self.limits.max_k, self.limits.max_history
        errors = []
        for request, loc in zip(requests, locs, strict=True):
            if request.k > max_k:
                msg = f"Input should be less than or equal to {max_k}"
                errors.append(input_error((*loc, "k"), msg, request.k, "less_than_equal"))
            if request.history is not None and len(request.history) > max_history:
                msg = f"List should have at most {max_history} items"
                errors.append(input_error((*loc, "history"), msg, len(request.history), "too_long"))
        if errors:
            raise InvalidInput(errors)

    def _check_feature_names(
        self, bundle: ServingBundle, requests: Sequence[RecallRequest], locs: Sequence[Loc]
    ) -> None:
        errors = []
        for request, loc in zip(requests, locs, strict=True):
            for name in bundle.encoder.unknown_names(request.features or {}):
                errors.append(unknown_feature_error((*loc, "features", name), name, bundle))
        if errors:
            raise InvalidInput(errors)

    async def _fetch(
        self, bundle: ServingBundle, requests: Sequence[RecallRequest]
    ) -> Mapping[str, UserRecord]:
        """Stored state of the users whose request does not already carry everything; an
        unavailable store degrades to request/default features (never an error)."""
        names = set(bundle.encoder.names)
        wanted = [
            r.user_id
            for r in requests
            if r.history is None or not names.issubset((r.features or {}).keys())
        ]
        if not wanted:
            return {}
        with self.metrics.stage("feature_fetch"):
            try:
                return await self.store.fetch_many(wanted)
            except FeatureStoreUnavailable as exc:
                log.debug("recall without stored features: %s", exc.detail)
                return {}

    @staticmethod
    def _prepare(
        bundle: ServingBundle, request: RecallRequest, record: UserRecord | None
    ) -> tuple[Query, FeatureSource]:
        record = record or EMPTY
        features = {**record.features, **(request.features or {})}
        history = request.history if request.history is not None else record.history
        source: FeatureSource = "default"
        if request.features or request.history is not None:
            source = "request"
        elif record.found:
            source = "redis"
        exclude: frozenset[int] = frozenset()
        if request.exclude_seen:
            index = bundle.item_index
            exclude = frozenset(index[item] for item in history if item in index)
        return Query(features, history, exclude, request.k), source

    async def _retrieve(self, bundle: ServingBundle, queries: list[Query]) -> list[Result]:
        observe = self.metrics.observe_stage
        small = bundle.index_type != "flat" or bundle.n_items <= INLINE_MAX_FLAT_ITEMS
        if len(queries) == 1 and small:
            return retrieve(bundle, queries, observe)
        return await anyio.to_thread.run_sync(retrieve, bundle, queries, observe)


def unknown_feature_error(loc: Loc, name: str, bundle: ServingBundle) -> dict[str, object]:
    accepted = ", ".join(sorted(bundle.encoder.names))
    msg = f"Unknown feature {name!r}; this model accepts: {accepted}"
    return input_error(loc, msg, name, "unknown_feature")

"""`RecallService`: request -> stored state -> prepared queries -> retrieve -> JSON response.

Concurrent `/v1/recall` requests of one worker are served in micro-batches (`app.batcher`):
one feature fetch, one tower call and one index search for every request waiting. Each
request is validated on its own before it joins a batch (its 422 is its own), each batch
reads the serving bundle once (every response in it names that version), and a failure of
one request's preparation or retrieval fails that request only.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import orjson

from app.batcher import MicroBatcher
from app.bundle_loader import ServingBundle
from app.cache import VectorCache
from app.errors import FeatureStoreUnavailable, InvalidInput, input_error
from app.feature_store import EMPTY, FeatureStore, UserRecord
from app.logs import note_model_version, unbind_request
from app.metrics import Metrics
from app.repository import ModelRepository
from app.retrieval import Query, Result, StageObserver, retrieve
from app.schemas import FeatureSource, RecallRequest
from models.features import Feature

log = logging.getLogger(__name__)

Loc = tuple[str | int, ...]
# A response as plain data, shaped exactly like `schemas.RecallResponse`; the routes declare
# that model for the OpenAPI document and send these serialised by orjson (no second pass
# through pydantic on the hot path).
ResponseData = dict[str, Any]
INLINE_FLAT_ITEMS = 50_000  # a lone query scanning up to this many items stays on the loop


@dataclass(frozen=True)
class Limits:
    max_k: int
    max_history: int
    max_batch: int  # requests in one /v1/recall/batch call
    micro_batch: int = 64  # concurrent /v1/recall requests served together


class RecallService:
    """Args:
    repository: source of the serving bundle (read once per batch).
    store: online user state.
    limits: run-time request bounds.
    metrics: stage timings, batch sizes and feature-source counts.
    executor: where encode + search run (one thread with the service's thread settings);
        None runs them on the event loop.
    vectors: encoded user vectors to reuse; None encodes every user.
    """

    def __init__(
        self,
        repository: ModelRepository,
        store: FeatureStore,
        limits: Limits,
        metrics: Metrics,
        executor: Executor | None = None,
        vectors: VectorCache | None = None,
    ) -> None:
        self.repository = repository
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self.executor = executor
        self.vectors = vectors
        self._batcher = MicroBatcher(
            self._serve_micro_batch, limits.micro_batch, metrics.batch_size.observe
        )

    async def recall(self, request: RecallRequest) -> bytes:
        """One recall, served together with whatever else is waiting; the JSON response."""
        self._check_limits([request], [("body",)])
        self._check_features(self.repository.require(), [request], [("body",)])
        payload, version = await self._batcher.submit(request)
        note_model_version(version)
        return payload

    async def recall_batch(self, requests: Sequence[RecallRequest]) -> bytes:
        """`/v1/recall/batch`: one batch as sent; the JSON `{"results": [...]}`."""
        if len(requests) > self.limits.max_batch:
            msg = f"List should have at most {self.limits.max_batch} items"
            raise InvalidInput([input_error(("body", "requests"), msg, len(requests), "too_long")])
        locs = [("body", "requests", i) for i in range(len(requests))]
        self._check_limits(requests, locs)
        bundle = self.repository.require()  # read once: the whole call uses this version
        self._check_features(bundle, requests, locs)
        note_model_version(bundle.version)
        outcomes = await self._recall(bundle, requests)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        with self.metrics.stage("serialise"):
            return orjson.dumps({"results": outcomes})

    async def _serve_micro_batch(
        self, requests: Sequence[RecallRequest]
    ) -> list[tuple[bytes, str] | BaseException]:
        """Each response with the version that answered it (for the request's access line)."""
        # The batcher's task was started by one of the requests, but serves all of them.
        unbind_request()
        bundle = self.repository.require()  # read once: the whole batch uses this version
        outcomes = await self._recall(bundle, requests)
        version = bundle.version
        with self.metrics.stage("serialise"):
            return [
                o if isinstance(o, BaseException) else (orjson.dumps(o), version) for o in outcomes
            ]

    async def _recall(
        self, bundle: ServingBundle, requests: Sequence[RecallRequest]
    ) -> list[ResponseData | BaseException]:
        """One response (or the request's own error) per request, all from `bundle`."""
        outcomes: list[ResponseData | BaseException | None] = [None] * len(requests)
        live: list[int] = []
        for i, request in enumerate(requests):
            # Validated against the bundle current at submission; a reload since may serve a
            # spec without some name: that request alone gets the 422.
            try:
                self._check_features(bundle, [request], [("body",)])
            except InvalidInput as exc:
                outcomes[i] = exc
            else:
                live.append(i)
        stored = await self._fetch(bundle, [requests[i] for i in live])
        prepared: list[tuple[int, Query, FeatureSource]] = []
        for i in live:
            try:
                query, source = self._prepare(bundle, requests[i], stored.get(requests[i].user_id))
            except Exception as exc:
                outcomes[i] = exc
            else:
                prepared.append((i, query, source))
        results = await self._retrieve(bundle, [query for _, query, _ in prepared])
        sources: Counter[FeatureSource] = Counter()
        for (i, _, source), items in zip(prepared, results, strict=True):
            if isinstance(items, BaseException):
                outcomes[i] = items
                continue
            sources[source] += 1
            outcomes[i] = {
                "user_id": requests[i].user_id,
                "model_version": bundle.version,
                "items": [{"item_id": item, "score": score} for item, score in items],
                "feature_source": source,
            }
        for source, count in sources.items():
            self.metrics.child(self.metrics.feature_source, source).inc(count)
        return [o for o in outcomes if o is not None]

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

    @staticmethod
    def _check_features(
        bundle: ServingBundle, requests: Sequence[RecallRequest], locs: Sequence[Loc]
    ) -> None:
        errors = []
        for request, loc in zip(requests, locs, strict=True):
            if request.features:
                errors.extend(feature_errors(bundle, request.features, (*loc, "features")))
        if errors:
            raise InvalidInput(errors)

    async def _fetch(
        self, bundle: ServingBundle, requests: Sequence[RecallRequest]
    ) -> Mapping[str, UserRecord]:
        """Stored state of the users whose request does not already carry everything, in one
        round trip; an unavailable store degrades to request/default features (never an
        error)."""
        names = bundle.encoder.names
        wanted = list(
            dict.fromkeys(
                r.user_id
                for r in requests
                if r.history is None or not all(n in (r.features or {}) for n in names)
            )
        )
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
        features = {**record.features, **request.features} if request.features else record.features
        history = request.history if request.history is not None else record.history
        source: FeatureSource = "default"
        if request.features or request.history is not None:
            source = "request"
        elif record.found:
            source = "redis"
        query = Query.prepare(
            bundle,
            features,
            history,
            request.k,
            exclude_seen=request.exclude_seen,
            user_id=request.user_id,
        )
        return query, source

    async def _retrieve(
        self, bundle: ServingBundle, queries: list[Query]
    ) -> list[Result | BaseException]:
        if not queries:
            return []
        args = (bundle, queries, self.metrics.observe_stage, self.vectors)
        if self.executor is None or _cheap(bundle, queries):
            return _retrieve_isolated(*args)
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, _retrieve_isolated, *args
        )


def _cheap(bundle: ServingBundle, queries: list[Query]) -> bool:
    """An ANN search (~0.2 ms a query), or one query on a small flat index, is cheaper on the
    event loop than a hop to the recall thread and back (1M HNSW, 2 workers: 1574 -> 1862
    rps, 1.16 -> 0.99 CPU ms a request). Exact scans of a big catalogue go to the thread, so
    the loop keeps reading requests (the next batch) meanwhile."""
    return bundle.index is not None or (len(queries) == 1 and bundle.n_items <= INLINE_FLAT_ITEMS)


def _retrieve_isolated(
    bundle: ServingBundle,
    queries: list[Query],
    observe: StageObserver,
    vectors: VectorCache | None,
) -> list[Result | BaseException]:
    """`retrieve` for the whole batch; if it fails, each query alone, so that a query that
    cannot be served fails by itself."""
    try:
        return list(retrieve(bundle, queries, observe, vectors))
    except Exception as exc:
        if len(queries) == 1:
            return [exc]
    outcomes: list[Result | BaseException] = []
    for query in queries:
        try:
            outcomes.extend(retrieve(bundle, [query], observe, vectors))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


# What the encoder (`models.features`) reads as a value of each kind; the request schema
# already allows only null, bool, int, float, str and lists of str.
ACCEPTED: dict[str, tuple[type, ...]] = {
    "categorical": (str, int),  # an int looks up its decimal string ("25")
    "multi_hot": (str, list),  # a list of values, or one string of them joined by the separator
    "numeric": (int, float),
}


def feature_errors(
    bundle: ServingBundle, features: Mapping[str, Any], loc: Loc
) -> list[dict[str, Any]]:
    """The 422 entries for request `features` (at `loc`): names the model does not know, and
    values of the wrong type for their feature's kind; null is a missing value of any kind.
    Stored features are not checked: the encoder reads a value it cannot use as missing."""
    errors = []
    for name in sorted(features):
        feature = bundle.encoder.by_name.get(name)
        if feature is None:
            errors.append(unknown_feature_error((*loc, name), name, bundle))
            continue
        value = features[name]
        # A bool is no number and no category, though Python's bool is an int.
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, ACCEPTED[feature.kind])
        ):
            errors.append(feature_type_error((*loc, name), feature, value))
    return errors


def feature_type_error(loc: Loc, feature: Feature, value: Any) -> dict[str, Any]:
    if feature.kind == "categorical":
        expected = "a string or an integer"
    elif feature.kind == "multi_hot":
        expected = f"a list of strings or one string joined by {feature.separator!r}"
    else:
        expected = "a number"
    got = _JSON_TYPES.get(type(value), "a list")
    msg = f"Feature {feature.name!r} is {feature.kind}: expected {expected}, got {got}"
    return input_error(loc, msg, value, "feature_type")


_JSON_TYPES = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}


def unknown_feature_error(loc: Loc, name: str, bundle: ServingBundle) -> dict[str, object]:
    accepted = ", ".join(sorted(bundle.encoder.names))
    msg = f"Unknown feature {name!r}; this model accepts: {accepted}"
    return input_error(loc, msg, name, "unknown_feature")

"""`RecallService`: request -> stored state -> prepared queries -> retrieve -> JSON response.

Concurrent `/v1/recall` requests of one worker are served in micro-batches (`app.batcher`):
one feature fetch, one tower call and one index search for every request waiting. Each
request is validated on its own before it joins a batch (its 422 is its own; its filter is
compiled then, against the serving version, and that compiled filter serves it unless a reload
came in between: `Checked`), each batch reads the serving model once (every response in it
names that version), and a failure of one request's preparation or retrieval fails that
request only. A `/v1/recall/batch` names at most MAX_BATCH_FILTERS distinct filters: each
compiles in passes over the catalogue.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anyio.to_thread
import orjson

from app.batcher import MicroBatcher
from app.config import RecallLimits
from app.errors import FeatureStoreUnavailable, InvalidInput, Loc, input_error, too_long
from app.feature_checks import feature_errors
from app.filters import MAX_BATCH_FILTERS, CompiledFilter, FilterCache, FilterInput, canonical
from app.logs import note_model_version, unbind_request
from app.metrics import Metrics
from app.model import ModelRepository, ServingModel
from app.retrieval import Query, Result, StageObserver, retrieve
from app.store import EMPTY, FeatureStore, UserRecord
from app.user_vector_cache import UserVectorCache

log = logging.getLogger(__name__)

FeatureSource = Literal["request", "redis", "default"]
# A response as plain data, shaped exactly like `app.http.schemas.RecallResponse`; the routes
# declare that model for the OpenAPI document and send these serialised by orjson (no second
# pass through pydantic on the hot path).
ResponseData = dict[str, Any]


class RecallInput(Protocol):
    """One user's recall as asked (`app.http.schemas.RecallRequest`, validated)."""

    @property
    def user_id(self) -> str: ...
    @property
    def k(self) -> int | None: ...
    @property
    def features(self) -> Mapping[str, Any] | None: ...
    @property
    def history(self) -> Sequence[str] | None: ...
    @property
    def exclude_seen(self) -> bool: ...
    @property
    def filter(self) -> FilterInput | None: ...


def filter_keys(requests: Sequence[RecallInput]) -> list[str | None]:
    """Each request's filter as its cache key (`app.filters.canonical`), computed once."""
    return [None if r.filter is None else canonical(r.filter) for r in requests]


@dataclass(frozen=True, slots=True)
class Checked:
    """A request validated against model `version`, with its filter compiled for it (served by
    that version, it is not compiled again: a batch of distinct filters compiled each twice,
    the second time after the filter cache had let it go)."""

    request: RecallInput
    version: str
    filter: CompiledFilter | None


class RecallService:
    """Args:
    repository: source of the serving model (read once per batch).
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
        limits: RecallLimits,
        metrics: Metrics,
        executor: Executor | None = None,
        vectors: UserVectorCache | None = None,
    ) -> None:
        self.repository = repository
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self.executor = executor
        self.vectors = vectors
        self.filters = FilterCache()
        self._batcher = MicroBatcher(
            self._serve_micro_batch, limits.micro_batch, metrics.batch_size.observe
        )

    async def recall(self, request: RecallInput) -> bytes:
        """One recall, served together with whatever else is waiting; the JSON response."""
        self._check_limits([request], [("body",)])
        model = self.repository.require()
        self._check_features(model, [request], [("body",)])
        (compiled,) = await self._compile_filters(model, filter_keys([request]), [("body",)])
        payload, version = await self._batcher.submit(Checked(request, model.version, compiled))
        note_model_version(version)
        return payload

    async def recall_batch(self, requests: Sequence[RecallInput]) -> bytes:
        """`/v1/recall/batch`: one batch as sent; the JSON `{"results": [...]}`."""
        if len(requests) > self.limits.max_batch:
            limit = self.limits.max_batch
            raise InvalidInput([too_long(("body", "requests"), limit, len(requests))])
        keys = filter_keys(requests)
        distinct = set(keys) - {None}
        if len(distinct) > MAX_BATCH_FILTERS:
            msg = f"at most {MAX_BATCH_FILTERS} distinct filters in one batch"
            raise InvalidInput([input_error(("body", "requests"), msg, len(distinct), "too_many")])
        locs = [("body", "requests", i) for i in range(len(requests))]
        self._check_limits(requests, locs)
        model = self.repository.require()  # read once: the whole call uses this version
        self._check_features(model, requests, locs)
        compiled = await self._compile_filters(model, keys, locs)
        note_model_version(model.version)
        checked = [Checked(r, model.version, f) for r, f in zip(requests, compiled, strict=True)]
        outcomes = await self._recall(model, checked)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        with self.metrics.stage("serialise"):
            return orjson.dumps({"results": outcomes})

    async def _serve_micro_batch(
        self, requests: Sequence[Checked]
    ) -> list[tuple[bytes, str] | BaseException]:
        """Each response with the version that answered it (for the request's access line)."""
        # The batcher's task was started by one of the requests, but serves all of them.
        unbind_request()
        model = self.repository.require()  # read once: the whole batch uses this version
        outcomes = await self._recall(model, requests)
        version = model.version
        with self.metrics.stage("serialise"):
            return [
                o if isinstance(o, BaseException) else (orjson.dumps(o), version) for o in outcomes
            ]

    async def _recall(
        self, model: ServingModel, checked: Sequence[Checked]
    ) -> list[ResponseData | BaseException]:
        """One response (or the request's own error) per request, all from `model`."""
        requests = [c.request for c in checked]
        outcomes: list[ResponseData | BaseException | None] = [None] * len(requests)
        live: list[tuple[int, CompiledFilter | None]] = []
        for i, c in enumerate(checked):
            if c.version == model.version:
                live.append((i, c.filter))
                continue
            # Validated against the model current at submission; a reload since may serve a
            # spec without some name: that request alone gets the 422.
            try:
                self._check_features(model, [c.request], [("body",)])
                filters = self._check_filters(model, filter_keys([c.request]), [("body",)])
            except InvalidInput as exc:
                outcomes[i] = exc
            else:
                live.append((i, filters[0]))
        stored = await self._fetch(model, [requests[i] for i, _ in live])
        prepared: list[tuple[int, Query, FeatureSource]] = []
        for i, compiled in live:
            try:
                record = stored.get(requests[i].user_id)
                k = self.limits.k(requests[i].k)
                query, source = self._prepare(model, requests[i], k, record, compiled)
            except Exception as exc:
                outcomes[i] = exc
            else:
                prepared.append((i, query, source))
        results = await self._retrieve(model, [query for _, query, _ in prepared])
        sources: Counter[FeatureSource] = Counter()
        for (i, _, source), items in zip(prepared, results, strict=True):
            if isinstance(items, BaseException):
                outcomes[i] = items
                continue
            sources[source] += 1
            outcomes[i] = {
                "user_id": requests[i].user_id,
                "model_version": model.version,
                "items": [{"item_id": item, "score": score} for item, score in items],
                "feature_source": source,
            }
        for source, count in sources.items():
            self.metrics.child(self.metrics.feature_source, source).inc(count)
        return [o for o in outcomes if o is not None]

    def _check_limits(self, requests: Sequence[RecallInput], locs: Sequence[Loc]) -> None:
        max_k, max_history = self.limits.max_k, self.limits.max_history
        errors = []
        for request, loc in zip(requests, locs, strict=True):
            if request.k is not None and request.k > max_k:
                msg = f"Input should be less than or equal to {max_k}"
                errors.append(input_error((*loc, "k"), msg, request.k, "less_than_equal"))
            if request.history is not None and len(request.history) > max_history:
                errors.append(too_long((*loc, "history"), max_history, len(request.history)))
        if errors:
            raise InvalidInput(errors)

    @staticmethod
    def _check_features(
        model: ServingModel, requests: Sequence[RecallInput], locs: Sequence[Loc]
    ) -> None:
        errors = []
        for request, loc in zip(requests, locs, strict=True):
            if request.features:
                errors.extend(feature_errors(model, request.features, (*loc, "features")))
        if errors:
            raise InvalidInput(errors)

    async def _compile_filters(
        self, model: ServingModel, keys: Sequence[str | None], locs: Sequence[Loc]
    ) -> list[CompiledFilter | None]:
        """`_check_filters`, in a worker thread when a filter is not compiled yet: a compile
        is passes over the catalogue (12 ms at 200k items, 43 ms at 1M), which on the event
        loop every request of the worker waited for."""
        if all(key is None or self.filters.cached(model, key) for key in keys):
            return self._check_filters(model, keys, locs)
        return await anyio.to_thread.run_sync(self._check_filters, model, keys, locs)

    def _check_filters(
        self, model: ServingModel, keys: Sequence[str | None], locs: Sequence[Loc]
    ) -> list[CompiledFilter | None]:
        """Each filter (by its `canonical` key) compiled for `model` (from the cache when seen
        before)."""
        compiled: list[CompiledFilter | None] = []
        errors: list[Any] = []
        for key, loc in zip(keys, locs, strict=True):
            try:
                compiled.append(None if key is None else self.filters.compiled(model, key, loc))
            except InvalidInput as exc:
                errors.extend(exc.detail)
        if errors:
            raise InvalidInput(errors)
        return compiled

    async def _fetch(
        self, model: ServingModel, requests: Sequence[RecallInput]
    ) -> Mapping[str, UserRecord]:
        """Stored state of the users whose request does not already carry everything, in one
        round trip; an unavailable store degrades to request/default features (never an
        error)."""
        names = model.encoder.names
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

    def _prepare(
        self,
        model: ServingModel,
        request: RecallInput,
        k: int,
        record: UserRecord | None,
        compiled: CompiledFilter | None = None,
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
            model,
            features,
            history,
            k,
            exclude_seen=request.exclude_seen,
            user_id=request.user_id,
            filter=compiled,
            history_cap=self.store.history_cap,
        )
        return query, source

    async def _retrieve(
        self, model: ServingModel, queries: list[Query]
    ) -> list[Result | BaseException]:
        if not queries:
            return []
        args = (model, queries, self.metrics.observe_stage, self.vectors)
        if self.executor is None or model.index.runs_inline(len(queries)):
            return _retrieve_isolated(*args)
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, _retrieve_isolated, *args
        )


def _retrieve_isolated(
    model: ServingModel,
    queries: list[Query],
    observe: StageObserver,
    vectors: UserVectorCache | None,
) -> list[Result | BaseException]:
    """`retrieve` for the whole batch; if it fails, each query alone, so that a query that
    cannot be served fails by itself."""
    try:
        return list(retrieve(model, queries, observe, vectors))
    except Exception as exc:
        if len(queries) == 1:
            return [exc]
    outcomes: list[Result | BaseException] = []
    for query in queries:
        try:
            outcomes.extend(retrieve(model, [query], observe, vectors))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes

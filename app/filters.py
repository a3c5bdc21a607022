"""Recall filters: a request's `filter` compiled against one model version's catalogue.

A filter (`app.http.schemas.RecallFilter`, docs/design.md) keeps the items whose attributes
pass every clause: `include` (a categorical value in the set, or a multi_hot value shared
with it), `exclude` (none of the values), `range` (a numeric value within the bounds; a
missing value never is), `allow_ids` (only these) and `deny_ids` (never these). Compiled, it
is a boolean mask over the catalogue's rows (`AllowedRows`, built with numpy from the bundle's
`ItemAttributes`) and a judge of one item's raw attributes (`accepts`), for items that are
not in the bundle. The same filter on many requests compiles once per model version
(`FilterCache`). Ids outside the catalogue are accepted in id lists (items can be added while
serving); an unknown attribute or value, or a clause the attribute's kind cannot take, is the
request's 422.
"""

from __future__ import annotations

import json
import logging
import operator
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import numpy as np

from app.errors import InvalidInput, Loc, input_error
from app.model import ServingModel
from app.search.allowed import AllowedRows
from models.feature_spec import as_float
from models.item_attributes import AttributeColumn, ItemAttributes

log = logging.getLogger(__name__)

# Compiled filters kept per worker: each holds a mask of one byte per catalogue item (1 MB at
# 1M) and, for a selective filter, its rows' vectors (at most 8.7 MB: `AllowedRows.kept`).
CACHE_SIZE = 16
# Distinct filters one /v1/recall/batch may name: each compiles in passes over the catalogue
# (one per attribute clause and bound), 256 of them held the event loop seconds.
MAX_BATCH_FILTERS = CACHE_SIZE
_BOUNDS: dict[str, Callable[[Any, Any], Any]] = {
    "gte": operator.ge,
    "gt": operator.gt,
    "lte": operator.le,
    "lt": operator.lt,
}


class RangeInput(Protocol):
    @property
    def gte(self) -> float | None: ...
    @property
    def gt(self) -> float | None: ...
    @property
    def lte(self) -> float | None: ...
    @property
    def lt(self) -> float | None: ...


class FilterInput(Protocol):
    """A request's filter as validated (`app.http.schemas.RecallFilter`)."""

    @property
    def include(self) -> Mapping[str, Sequence[str]] | None: ...
    @property
    def exclude(self) -> Mapping[str, Sequence[str]] | None: ...
    @property
    def range(self) -> Mapping[str, RangeInput] | None: ...
    @property
    def allow_ids(self) -> Sequence[str] | None: ...
    @property
    def deny_ids(self) -> Sequence[str] | None: ...


@dataclass(frozen=True, eq=False)
class CompiledFilter:
    """One filter for one model version.

    Attributes:
        key: the filter's canonical JSON (the cache key, with the version).
        allowed: the catalogue rows that pass.
        include, exclude: attribute -> values.
        ranges: attribute -> {bound name: value}.
        allow_ids: None when the filter has no allow list.
        deny_ids: ids never returned.
        added_revision: the item changes' revision it was compiled at when some of its values
            are known only through items added at serving time (they may go), else None.
    """

    key: str
    allowed: AllowedRows
    include: Mapping[str, frozenset[str]]
    exclude: Mapping[str, frozenset[str]]
    ranges: Mapping[str, Mapping[str, float]]
    allow_ids: frozenset[str] | None
    deny_ids: frozenset[str]
    columns: Mapping[str, AttributeColumn]
    added_revision: int | None = None

    def holds_for(self, model: ServingModel) -> bool:
        """Whether it still holds for `model` (its version's): a filter whose values only
        added items had is judged again once the items changed, as those may be gone."""
        return self.added_revision in (None, model.overlay.revision)

    def accepts(self, item_id: str, attributes: Mapping[str, Any]) -> bool:
        """Whether an item with these raw attributes (as the item table holds them; absent
        = missing) passes: how items outside the bundle are judged."""
        if item_id in self.deny_ids or (
            self.allow_ids is not None and item_id not in self.allow_ids
        ):
            return False
        for name, values in self.include.items():
            if values.isdisjoint(self.columns[name].raw_values(attributes.get(name))):
                return False
        for name, values in self.exclude.items():
            if not values.isdisjoint(self.columns[name].raw_values(attributes.get(name))):
                return False
        for name, bounds in self.ranges.items():
            number = as_float(attributes.get(name))
            if not all(_BOUNDS[op](number, bound) for op, bound in bounds.items()):
                return False  # NaN (missing) fails every comparison
        return True


def canonical(spec: FilterInput) -> str:
    """The filter as JSON with sets sorted and duplicates dropped: equal filters, equal keys."""
    ranges = {
        name: {op: float(getattr(bounds, op)) for op in _BOUNDS if getattr(bounds, op) is not None}
        for name, bounds in (spec.range or {}).items()
    }
    return json.dumps(
        {
            "include": {n: sorted(set(v)) for n, v in (spec.include or {}).items()},
            "exclude": {n: sorted(set(v)) for n, v in (spec.exclude or {}).items()},
            "range": ranges,
            "allow_ids": None if spec.allow_ids is None else sorted(set(spec.allow_ids)),
            "deny_ids": sorted(set(spec.deny_ids or ())),
        },
        sort_keys=True,
    )


def compile_filter(model: ServingModel, spec: FilterInput, loc: Loc) -> CompiledFilter:
    """`spec` against `model`'s catalogue.

    Raises:
        InvalidInput: every clause the catalogue cannot take, each with its reason.
    """
    return _compile(model, canonical(spec), loc)


def _compile(model: ServingModel, key: str, loc: Loc) -> CompiledFilter:
    data = json.loads(key)
    attributes = model.item_attributes
    errors, on_added = _check(attributes, data, (*loc, "filter"), model.overlay.attributes)
    if errors:
        raise InvalidInput(errors)
    columns = {} if attributes is None else dict(attributes.columns)
    mask = np.ones(model.n_items, dtype=bool)
    for clause, keep in (("include", True), ("exclude", False)):
        for name, values in data[clause].items():
            column = columns[name]
            hit = column.rows_with_any(column.lookup(values)[0])
            mask &= hit if keep else ~hit
    for name, bounds in data["range"].items():
        numbers = columns[name].numbers
        for op, bound in bounds.items():
            mask &= _BOUNDS[op](numbers, bound)
    rows = model.encoder.item_index
    if data["allow_ids"] is not None:
        listed = np.zeros(model.n_items, dtype=bool)
        listed[[rows[i] for i in data["allow_ids"] if i in rows]] = True
        mask &= listed
    mask[[rows[i] for i in data["deny_ids"] if i in rows]] = False
    return CompiledFilter(
        key=key,
        allowed=AllowedRows(mask),
        include={n: frozenset(v) for n, v in data["include"].items()},
        exclude={n: frozenset(v) for n, v in data["exclude"].items()},
        ranges=data["range"],
        allow_ids=None if data["allow_ids"] is None else frozenset(data["allow_ids"]),
        deny_ids=frozenset(data["deny_ids"]),
        columns=columns,
        added_revision=model.overlay.revision if on_added else None,
    )


def _check(
    attributes: ItemAttributes | None,
    data: dict[str, Any],
    loc: Loc,
    added: Sequence[Mapping[str, Any]],
) -> tuple[list[Any], bool]:
    """The 422 entries for attributes the catalogue lacks, values that neither its dictionary
    nor an item added at serving time (`added`: their raw attributes) has, and clauses the
    attribute's kind cannot take; and whether a value is known through added items only."""
    errors = []
    on_added = False
    columns = {} if attributes is None else attributes.columns
    known = ", ".join(sorted(columns)) or "none: this model version has no item attributes"
    for clause in ("include", "exclude", "range"):
        for name, values in data[clause].items():
            where = (*loc, clause, name)
            column = columns.get(name)
            if column is None:
                msg = f"unknown item attribute {name!r} (attributes: {known})"
                errors.append(input_error(where, msg, name, "filter_unknown_attribute"))
            elif (clause == "range") != (column.kind == "numeric"):
                msg = (
                    f"attribute {name!r} is numeric: filter it with range"
                    if clause != "range"
                    else f"range needs a numeric attribute; {name!r} is {column.kind}"
                )
                errors.append(input_error(where, msg, name, "filter_wrong_kind"))
            elif clause != "range":
                unknown = column.lookup(values)[1]
                if unknown and added:  # a value that only added items have is known too
                    seen = {v for item in added for v in column.raw_values(item.get(name))}
                    on_added = on_added or any(value in seen for value in unknown)
                    unknown = [value for value in unknown if value not in seen]
                if unknown:
                    msg = f"unknown value(s) of item attribute {name!r}: {unknown[:10]}"
                    errors.append(input_error(where, msg, unknown[:10], "filter_unknown_value"))
    return errors, on_added


class FilterCache:
    """The last CACHE_SIZE compiled filters of this worker, by (model version, filter)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._compiled: OrderedDict[tuple[str, str], CompiledFilter] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, model: ServingModel, key: str) -> bool:
        """Whether `compiled` would answer the filter of canonical JSON `key` from the cache."""
        with self._lock:
            found = self._compiled.get((model.version, key))
        return found is not None and found.holds_for(model)

    def get(self, model: ServingModel, spec: FilterInput, loc: Loc) -> CompiledFilter:
        """The compiled filter, compiled now if absent (raising its InvalidInput)."""
        return self.compiled(model, canonical(spec), loc)

    def compiled(self, model: ServingModel, key: str, loc: Loc = ("filter",)) -> CompiledFilter:
        """The filter of canonical JSON `key` compiled for `model`, from the cache or now."""
        entry = (model.version, key)
        with self._lock:
            found = self._compiled.get(entry)
            if found is not None and found.holds_for(model):
                self._compiled.move_to_end(entry)
                return found
        compiled = _compile(model, key, loc)
        with self._lock:
            self._compiled[entry] = compiled
            if len(self._compiled) > self.size:
                self._compiled.popitem(last=False)
        return compiled

    def recent(self, version: str) -> list[CompiledFilter]:
        """The filters compiled for `version`, the most recently used first."""
        with self._lock:
            return [f for (v, _), f in reversed(self._compiled.items()) if v == version]


class FilterWarmup:
    """The model hook (`app.model.repository.ModelHook`) that gives a model, before it serves,
    the filter indexes the serving model has (`app.search.filter_index`): each such filter
    compiled for the new model and its index built off the request path, so a hot reload
    does not send the worker's hot filters back to the slow filtered search.

    Args:
        current: the serving model (None: none yet).
        cache: this worker's compiled filters.
    """

    def __init__(self, current: Callable[[], ServingModel | None], cache: FilterCache) -> None:
        self.current = current
        self.cache = cache

    async def prepare(self, model: ServingModel) -> ServingModel:
        serving = self.current()
        if serving is None:
            return model
        try:
            for old in self.cache.recent(serving.version):
                if not serving.index.has_filter_index(old.allowed):
                    continue
                try:
                    new = self.cache.compiled(model, old.key)
                except InvalidInput:
                    continue  # an attribute or value the new catalogue does not have
                await anyio.to_thread.run_sync(model.index.build_filter_index, new.allowed)
        except Exception:  # never refuse a bundle for a warm-up: it serves, colder
            log.exception("cannot build filter indexes for bundle %s", model.version)
        return model

    def rebase(self, model: ServingModel) -> ServingModel:
        return model

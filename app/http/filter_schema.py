"""`RecallFilter`: the `filter` of a recall request (docs/design.md, "Recall filters").

Its shape is checked here, before any model is asked: bounded sizes, at least one clause, no
empty range, nothing both kept and dropped. What the serving version's catalogue cannot take
(an unknown attribute or value, a clause of the wrong kind) `app.filters` reports.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StringConstraints,
    model_validator,
)

from app.http.fields import MAX_STRING_VALUE, ExternalId, Name

# A filter's size bounds what compiling it costs (each attribute clause is one pass over the
# catalogue; each id one lookup).
MAX_FILTER_ATTRIBUTES = 16
MAX_FILTER_VALUES = 256
MAX_FILTER_IDS = 1000
AttributeValues = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_STRING_VALUE)]],
    Field(min_length=1, max_length=MAX_FILTER_VALUES),
]
AttributeClause = Annotated[
    dict[Name, AttributeValues], Field(min_length=1, max_length=MAX_FILTER_ATTRIBUTES)
]
Bound = Annotated[StrictFloat, Field(allow_inf_nan=False)]  # a JSON number (no "5", no true)
IdList = Annotated[list[ExternalId], Field(min_length=1, max_length=MAX_FILTER_IDS)]


class AttributeRange(BaseModel):
    """Bounds on a numeric attribute; an item whose value is missing is outside every range."""

    model_config = ConfigDict(extra="forbid")

    gte: Bound | None = None
    gt: Bound | None = None
    lte: Bound | None = None
    lt: Bound | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> AttributeRange:
        lows = [(b, b == self.gt) for b in (self.gte, self.gt) if b is not None]
        highs = [(b, b == self.lt) for b in (self.lte, self.lt) if b is not None]
        if not lows and not highs:
            raise ValueError("a range needs at least one of gte, gt, lte, lt")
        for low, strict_low in lows:
            for high, strict_high in highs:
                if low > high or (low == high and (strict_low or strict_high)):
                    raise ValueError("the range is empty: its lower bound is above its upper one")
        return self


class RecallFilter(BaseModel):
    """Which items a recall may return; every clause given must hold (AND), and the seen-item
    exclusion applies on top. `include`: a categorical attribute's value is one of those
    listed, a multi_hot attribute shares at least one of them; `exclude`: none of them;
    `range`: a numeric attribute within the bounds; `allow_ids`: only these items; `deny_ids`:
    never these. Attributes and values must exist in the catalogue of the serving version
    (else 422); ids need not."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "minProperties": 1,  # and one of them not null (`_consistent`)
            "examples": [
                {
                    "include": {"category": ["c1", "c2"], "tags": ["t3"]},
                    "exclude": {"tags": ["t9"]},
                    "range": {"price": {"gte": 5, "lt": 20}},
                    "deny_ids": ["i17"],
                }
            ],
        },
    )

    include: AttributeClause | None = None
    exclude: AttributeClause | None = None
    range: Annotated[
        dict[Name, AttributeRange] | None,
        Field(min_length=1, max_length=MAX_FILTER_ATTRIBUTES),
    ] = None
    allow_ids: IdList | None = None
    deny_ids: IdList | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RecallFilter:
        if all(getattr(self, c) is None for c in type(self).model_fields):
            raise ValueError("a filter needs at least one clause")
        for name, values in (self.include or {}).items():
            both = set(values) & set((self.exclude or {}).get(name, ()))
            if both:
                raise ValueError(f"{name!r} both includes and excludes {sorted(both)[:10]}")
        both = set(self.allow_ids or ()) & set(self.deny_ids or ())
        if both:
            raise ValueError(f"ids both allowed and denied: {sorted(both)[:10]}")
        return self

"""Raw item attributes checked against the bundle's item encoder before the item tower reads
them: names it knows and values of the type their kind reads (the 422 entries of an item
write). The same rules as the user features' (`app.feature_checks`), one layer lower so the
model can refuse bad input itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app.errors import input_error
from models.features import Feature, FeatureEncoder

Loc = tuple[str | int, ...]

# What the encoder (`models.features`) reads as a value of each kind.
ACCEPTED: dict[str, tuple[type, ...]] = {
    "categorical": (str, int),  # an int looks up its decimal string ("25")
    "multi_hot": (str, list, tuple),  # values, or one string of them joined by the separator
    "numeric": (int, float),
}
_EXPECTED = {
    "categorical": "a string or an integer",
    "multi_hot": "a list of strings or one string joined by {separator!r}",
    "numeric": "a number",
}


def attribute_errors(
    encoder: FeatureEncoder, rows: Sequence[Mapping[str, Any]], loc: Loc
) -> list[dict[str, Any]]:
    """The 422 entries for raw item attribute dicts `rows` (row i at `(*loc, i)`): names the
    item encoder does not know, values of the wrong type for their kind. None is a missing
    value of any kind; an unseen categorical value is legal (it encodes as unknown)."""
    errors = []
    for i, row in enumerate(rows):
        for name in sorted(row):
            where = (*loc, i, name)
            feature = encoder.by_name.get(name)
            if feature is None:
                accepted = ", ".join(encoder.names) or "none"
                msg = f"Unknown item attribute {name!r}; this model's item tower reads: {accepted}"
                errors.append(input_error(where, msg, name, "unknown_attribute"))
            elif not _accepts(feature, row[name]):
                errors.append(_type_error(where, feature, row[name]))
    return errors


def _accepts(feature: Feature, value: Any) -> bool:
    # A bool is no number and no category, though Python's bool is an int.
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, ACCEPTED[feature.kind]):
        return False
    if isinstance(value, list | tuple):
        return all(isinstance(v, str) for v in value)
    return True


def _type_error(loc: Loc, feature: Feature, value: Any) -> dict[str, Any]:
    expected = _EXPECTED[feature.kind].format(separator=feature.separator)
    got = type(value).__name__
    msg = f"Item attribute {feature.name!r} is {feature.kind}: expected {expected}, got {got}"
    return input_error(loc, msg, value, "attribute_type")

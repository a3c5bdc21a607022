"""Raw values checked against a feature spec before an encoder reads them: the names it knows
and values of the type each kind reads. One rule for the user features of a request
(`app.feature_checks`) and the item attributes of an item write (here, one layer lower, so
the model can refuse bad input itself); the 422 entries in pydantic's shape."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from app.errors import Loc, input_error
from models.features import Feature, FeatureEncoder

# What the encoder (`models.features`) reads as a value of each kind; None is a missing value
# of any kind, and an unseen categorical value is legal (it encodes as unknown).
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
_JSON_TYPES = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}


def accepts(feature: Feature, value: Any) -> bool:
    """Whether the encoder reads `value` as a value of `feature`'s kind."""
    if value is None:
        return True
    # A bool is no number and no category, though Python's bool is an int.
    if isinstance(value, bool) or not isinstance(value, ACCEPTED[feature.kind]):
        return False
    if isinstance(value, list | tuple):
        return all(isinstance(v, str) for v in value)
    return True


def type_error(
    loc: Loc, feature: Feature, value: Any, of: Literal["feature", "attribute"]
) -> dict[str, Any]:
    """The 422 entry of a value `accepts` refuses, `of` a user feature or an item attribute."""
    expected = _EXPECTED[feature.kind].format(separator=feature.separator)
    got = _JSON_TYPES.get(type(value), "a list" if isinstance(value, list | tuple) else "an object")
    label = "Feature" if of == "feature" else "Item attribute"
    msg = f"{label} {feature.name!r} is {feature.kind}: expected {expected}, got {got}"
    return input_error(loc, msg, value, f"{of}_type")


def attribute_errors(
    encoder: FeatureEncoder, rows: Sequence[Mapping[str, Any]], loc: Loc
) -> list[dict[str, Any]]:
    """The 422 entries for raw item attribute dicts `rows` (row i at `(*loc, i)`): names the
    item encoder does not know, values of the wrong type for their kind."""
    errors = []
    for i, row in enumerate(rows):
        for name in sorted(row):
            where = (*loc, i, name)
            feature = encoder.by_name.get(name)
            if feature is None:
                accepted = ", ".join(encoder.names) or "none"
                msg = f"Unknown item attribute {name!r}; this model's item tower reads: {accepted}"
                errors.append(input_error(where, msg, name, "unknown_attribute"))
            elif not accepts(feature, row[name]):
                errors.append(type_error(where, feature, row[name], "attribute"))
    return errors

"""Request features checked against the serving model's feature spec: names it knows, and
values of the type their kind reads (the 422 entries; recall and feature writes alike)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.errors import input_error
from app.model import ServingModel
from models.features import Feature

Loc = tuple[str | int, ...]


# What the encoder (`models.features`) reads as a value of each kind; the request schema
# already allows only null, bool, int, float, str and lists of str.
ACCEPTED: dict[str, tuple[type, ...]] = {
    "categorical": (str, int),  # an int looks up its decimal string ("25")
    "multi_hot": (str, list),  # a list of values, or one string of them joined by the separator
    "numeric": (int, float),
}


def feature_errors(
    model: ServingModel, features: Mapping[str, Any], loc: Loc
) -> list[dict[str, Any]]:
    """The 422 entries for request `features` (at `loc`): names the model does not know, and
    values of the wrong type for their feature's kind; null is a missing value of any kind.
    Stored features are not checked: the encoder reads a value it cannot use as missing."""
    errors = []
    for name in sorted(features):
        feature = model.encoder.by_name.get(name)
        if feature is None:
            errors.append(unknown_feature_error((*loc, name), name, model))
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


def unknown_feature_error(loc: Loc, name: str, model: ServingModel) -> dict[str, object]:
    accepted = ", ".join(sorted(model.encoder.names))
    msg = f"Unknown feature {name!r}; this model accepts: {accepted}"
    return input_error(loc, msg, name, "unknown_feature")

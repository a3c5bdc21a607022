"""Request features checked against the serving model's feature spec: names it knows, and
values of the type their kind reads (the 422 entries; recall and feature writes alike)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.errors import Loc, input_error
from app.model import ServingModel
from app.model.value_checks import accepts, type_error


def feature_errors(
    model: ServingModel, features: Mapping[str, Any], loc: Loc
) -> list[dict[str, Any]]:
    """The 422 entries for request `features` (at `loc`): names the model does not know, and
    values of the wrong type for their feature's kind (`app.model.value_checks`). Stored
    features are not checked: the encoder reads a value it cannot use as missing."""
    errors = []
    for name in sorted(features):
        feature = model.encoder.by_name.get(name)
        if feature is None:
            errors.append(unknown_feature_error((*loc, name), name, model))
        elif not accepts(feature, features[name]):
            errors.append(type_error((*loc, name), feature, features[name], "feature"))
    return errors


def unknown_feature_error(loc: Loc, name: str, model: ServingModel) -> dict[str, object]:
    accepted = ", ".join(sorted(model.encoder.names))
    msg = f"Unknown feature {name!r}; this model accepts: {accepted}"
    return input_error(loc, msg, name, "unknown_feature")

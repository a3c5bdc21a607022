"""The OpenAPI document, with the limits that come from settings written into the schemas
(pydantic models carry only the static bounds), and the names of a mapping's keys checked as
the service checks them."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.config import RecallLimits


def document_limits(app: FastAPI, limits: RecallLimits) -> None:
    """Make `app.openapi()` state MAX_K, MAX_HISTORY and MAX_BATCH as they are configured, and
    constrain every mapping's key names by their pattern (`_pattern_keys`)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        models = schema["components"]["schemas"]
        recall = models["RecallRequest"]["properties"]
        for branch in recall["k"]["anyOf"]:
            if branch.get("type") == "integer":
                branch["maximum"] = limits.max_k
        for branch in recall["history"]["anyOf"]:
            if branch.get("type") == "array":
                branch["maxItems"] = limits.max_history
        models["BatchRecallRequest"]["properties"]["requests"]["maxItems"] = limits.max_batch
        models["EventsRequest"]["properties"]["item_ids"]["maxItems"] = limits.max_history
        _pattern_keys(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _pattern_keys(node: Any) -> None:
    """Pydantic writes a dict whose keys have a pattern (feature and attribute names) as
    `patternProperties`, which leaves a key that misses the pattern (a control character)
    unconstrained and so valid, though the service refuses it. Here such a mapping states
    the pattern in `propertyNames` and its values' schema in `additionalProperties`."""
    if isinstance(node, list):
        for child in node:
            _pattern_keys(child)
    if not isinstance(node, dict):
        return
    patterns = node.get("patternProperties")
    if isinstance(patterns, dict) and len(patterns) == 1 and "properties" not in node:
        ((pattern, values),) = patterns.items()
        del node["patternProperties"]
        node["propertyNames"] = {**node.get("propertyNames", {}), "pattern": pattern}
        node["additionalProperties"] = values
    for child in node.values():
        _pattern_keys(child)

"""The OpenAPI document, with the limits that come from settings written into the schemas
(pydantic models carry only the static bounds)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.config import RecallLimits


def document_limits(app: FastAPI, limits: RecallLimits) -> None:
    """Make `app.openapi()` state MAX_K, MAX_HISTORY and MAX_BATCH as they are configured."""
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
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

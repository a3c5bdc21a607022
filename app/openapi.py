"""The OpenAPI document, with the limits that come from settings written into the schemas
(pydantic models carry only the static bounds)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.settings import Settings


def document_limits(app: FastAPI, settings: Settings) -> None:
    """Make `app.openapi()` state MAX_K, MAX_HISTORY and MAX_BATCH as they are configured."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        models = schema["components"]["schemas"]
        recall = models["RecallRequest"]["properties"]
        recall["k"]["maximum"] = settings.max_k
        for branch in recall["history"]["anyOf"]:
            if branch.get("type") == "array":
                branch["maxItems"] = settings.max_history
        models["BatchRecallRequest"]["properties"]["requests"]["maxItems"] = settings.max_batch
        models["EventsRequest"]["properties"]["item_ids"]["maxItems"] = settings.max_history
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.http.deps import AdminDep, ServicesDep
from app.http.schemas import (
    BODY_ERRORS,
    ErrorResponse,
    ModelsResponse,
    ReloadRequest,
    ReloadResponse,
)

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])

AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token"},
    403: {"model": ErrorResponse, "description": "Admin API disabled (ADMIN_TOKEN unset)"},
}


@router.post(
    "/reload",
    responses={
        **AUTH_ERRORS,
        **BODY_ERRORS,
        404: {"model": ErrorResponse, "description": "No such version (or no LATEST)"},
        409: {"model": ErrorResponse, "description": "Bundle rejected; the old one serves on"},
        422: {"model": ErrorResponse, "description": "Not a version name"},
        503: {
            "model": ErrorResponse,
            "description": "Redis unavailable: the version cannot reach the other workers, so "
            "nothing changed",
        },
    },
    summary="Make a bundle version the one every worker serves",
)
async def reload(services: ServicesDep, body: ReloadRequest | None = None) -> ReloadResponse:
    """Verifies, loads, indexes and warms up the version (default: LATEST) off the request
    path and swaps it in atomically in this worker; requests in flight finish on the version
    they began. A `version` is pinned for every worker and replica (through Redis); no version
    clears the pin. The other workers follow within RELOAD_POLL_S (see `/health/ready`)."""
    swap = await services.sync.reload(body.version if body else None)
    previous = swap.previous.version if swap.previous else None
    return ReloadResponse(model_version=swap.current.version, previous_version=previous)


@router.get("/models", responses=AUTH_ERRORS, summary="Available versions and the active one")
def models(services: ServicesDep) -> ModelsResponse:
    repository, active = services.repository, services.repository.current
    return ModelsResponse(
        active=active.version if active else None,
        latest=repository.latest(),
        pinned=services.sync.pinned,
        reload_error=services.sync.error,
        versions=repository.versions(),
    )

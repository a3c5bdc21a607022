from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import AdminDep, RepositoryDep
from app.schemas import ErrorResponse, ModelsResponse, ReloadRequest, ReloadResponse

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])

AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token"},
    403: {"model": ErrorResponse, "description": "Admin API disabled (ADMIN_TOKEN unset)"},
}


@router.post(
    "/reload",
    responses={
        **AUTH_ERRORS,
        404: {"model": ErrorResponse, "description": "No such version (or no LATEST)"},
        409: {"model": ErrorResponse, "description": "Bundle rejected; the old one serves on"},
        422: {"model": ErrorResponse, "description": "Not a version name"},
    },
    summary="Load a bundle version and swap it in",
)
async def reload(repository: RepositoryDep, body: ReloadRequest | None = None) -> ReloadResponse:
    """Verifies, loads, indexes and warms up the version (default: LATEST) off the request
    path, then swaps it in atomically; requests in flight finish on the version they began."""
    swap = await repository.reload(body.version if body else None)
    previous = swap.previous.version if swap.previous else None
    return ReloadResponse(model_version=swap.current.version, previous_version=previous)


@router.get("/models", responses=AUTH_ERRORS, summary="Available versions and the active one")
def models(repository: RepositoryDep) -> ModelsResponse:
    active = repository.current
    return ModelsResponse(
        active=active.version if active else None,
        latest=repository.latest(),
        versions=repository.versions(),
    )

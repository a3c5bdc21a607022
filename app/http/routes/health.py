from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.http.deps import MetricsDep, ServicesDep
from app.http.schemas import ErrorResponse, LiveResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="The process is up")
async def live() -> LiveResponse:
    return LiveResponse()


@router.get(
    "/health/ready",
    responses={503: {"model": ErrorResponse, "description": "No model serving (the reason)"}},
    summary="A model is loaded and warmed up",
)
async def ready(services: ServicesDep) -> ReadyResponse:
    """200 once a bundle serves, whatever Redis does (recall degrades without it); `redis`
    reports a live probe of it, bounded by REDIS_TIMEOUT_MS. Each worker process answers for
    itself: `worker` names it, `reload_error` says why it does not serve the desired version."""
    model = services.repository.require()  # 503 with the reason until one serves
    return ReadyResponse(
        model_version=model.version,
        n_items=model.n_items,
        index_type=model.index_type,
        redis=await services.store.health(),
        worker=services.worker,
        reload_error=services.sync.error,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

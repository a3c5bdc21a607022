"""The ASGI app: `create_app()` and its lifespan. `app.main:app` is what uvicorn serves."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.config import RecallLimits
from app.http.access_log import AccessLog
from app.http.errors import install_error_handlers
from app.http.fast_path import RecallFastPath
from app.http.middleware import BodyLimitMiddleware, RequestObserver
from app.http.openapi import document_limits
from app.http.router import ROUTERS, service_routes
from app.metrics import Metrics
from app.services import build_services, configure_threads
from app.settings import Settings, get_settings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    configure_threads(settings.torch_threads)
    services = build_services(settings, app.state.metrics)
    app.state.services = services
    # Listening at once, ready only after load + warm-up (in the background); a missing or bad
    # bundle leaves the process up, not ready. Then a watcher keeps this worker on the fleet's
    # version (app/model/sync.py).
    services.start()
    try:
        yield
    finally:
        await services.aclose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # Python's warnings (numpy's, a library's deprecations) as log lines in the service's
    # format, not bare text on stderr (`app.logs.logging_config` gives the root its handler).
    logging.captureWarnings(True)
    app = FastAPI(
        title="tower-recall",
        summary="Two-tower candidate retrieval: top-K items for a user in milliseconds.",
        version="0.1.0",
        lifespan=lifespan,
        # A trailing slash is a 404, not a 307 to a Location built from the Host header.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    install_error_handlers(app)
    # Innermost: sees bodies the limit below already bounded; answers JSON recalls itself.
    app.add_middleware(RecallFastPath, routes=service_routes())
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
    )
    # Outermost, so requests refused by the body limit are counted, logged and given ids too.
    app.add_middleware(
        RequestObserver,
        metrics=app.state.metrics,
        routes=service_routes(),
        access_log=AccessLog(settings.log_format) if settings.access_log else None,
    )
    for router in ROUTERS:
        app.include_router(router)
    document_limits(app, RecallLimits.from_settings(settings))
    return app


app = create_app()

"""Route dependencies as `Annotated` aliases.

All are `async def` although none awaits: FastAPI runs a plain `def` dependency in the
thread pool, a hop that would cost more than the recall itself."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp

from app.errors import AdminDisabled, Unauthorized
from app.http.fields import ID_PATTERN, MAX_ID_LENGTH
from app.metrics import Metrics
from app.recall import RecallService
from app.services import Services
from app.settings import Settings
from app.users import UserService


def services_of(app: ASGIApp) -> Services | None:
    """The app's services: built by its lifespan (`app.main`), None until then. The one place
    a request finds them, through a dependency or in the recall fast path."""
    state = getattr(app, "state", None)
    return getattr(state, "services", None)


async def get_services(request: Request) -> Services:
    services = services_of(request.app)
    assert services is not None, "requests are served within the lifespan"
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_settings(services: ServicesDep) -> Settings:
    return services.settings


async def get_recall(services: ServicesDep) -> RecallService:
    return services.recall


async def get_users(services: ServicesDep) -> UserService:
    return services.users


async def get_metrics(services: ServicesDep) -> Metrics:
    return services.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
RecallDep = Annotated[RecallService, Depends(get_recall)]
UsersDep = Annotated[UserService, Depends(get_users)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def id_path(example: str) -> Any:
    """A path id's checks (as a body's ids): the `Annotated` metadata of a route parameter."""
    return Path(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN, examples=[example])


UserIdPath = Annotated[str, id_path("u42")]

# auto_error=False: a missing or malformed header is ours to answer (401 + WWW-Authenticate).
bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <ADMIN_TOKEN>")


async def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    expected = settings.admin_token.get_secret_value()
    if not expected:
        raise AdminDisabled("admin API disabled: ADMIN_TOKEN is not set")
    if credentials is None:
        raise Unauthorized("missing bearer token")
    # Bytes: compare_digest refuses non-ASCII str, and a header may carry any latin-1 text.
    if not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise Unauthorized("invalid bearer token")


AdminDep = Depends(require_admin)

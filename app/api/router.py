from fastapi import APIRouter
from starlette.routing import BaseRoute

from app.api.routes import admin, health, recall, users

ROUTERS = (recall.router, users.router, health.router, admin.router)

api_router = APIRouter()
for _router in ROUTERS:
    api_router.include_router(_router)


def service_routes() -> list[BaseRoute]:
    """The service's own routes (full paths), for labelling requests refused before routing."""
    return [route for router in ROUTERS for route in router.routes]

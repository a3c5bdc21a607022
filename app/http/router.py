from starlette.routing import BaseRoute

from app.http.routes import admin, health, items, recall, users

# Included one by one into the app, not through a parent router: FastAPI walks nested
# routers level by level on every request.
ROUTERS = (recall.router, users.router, items.router, health.router, admin.router)


def service_routes() -> list[BaseRoute]:
    """The service's own routes (full paths), for labelling requests refused before routing."""
    return [route for router in ROUTERS for route in router.routes]

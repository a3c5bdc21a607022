"""The service's exceptions: one class per failure, each carrying its HTTP status, all mapped
to a JSON `{"detail": ...}` body in one place (`app.http.errors`; kserve style)."""

from __future__ import annotations

from typing import Any, ClassVar

# A detail is a message, or FastAPI's validation-error list for input errors.
Detail = str | list[dict[str, Any]]


class AppError(Exception):
    """Base class: `status_code` and optional response `headers` are fixed per subclass."""

    status_code: ClassVar[int] = 500
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, detail: Detail) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(AppError):
    """A request that passed schema validation breaks a limit only known at run time (MAX_K,
    MAX_HISTORY, MAX_BATCH), names an unknown feature or gives one a value of the wrong type;
    same body shape as FastAPI's 422."""

    status_code = 422


class VersionNotFound(AppError):
    status_code = 404


class BundleRejected(AppError):
    """The bundle failed verification, loading or warm-up; nothing was swapped."""

    status_code = 409


class ItemTowerUnavailable(AppError):
    """The serving bundle has no item tower (bundle format 1), so items cannot be embedded:
    re-export it with the current trainer (bundle format 2)."""

    status_code = 409


class ModelNotReady(AppError):
    """No bundle is serving (none yet, or the start-up load failed)."""

    status_code = 503


class FeatureStoreUnavailable(AppError):
    """Redis is down, slow beyond the timeout, or erroring; writes cannot be accepted."""

    status_code = 503


class ItemChangesUnavailable(AppError):
    """The item change log (Redis) cannot be written: the change was not made anywhere."""

    status_code = 503


class ItemNotFound(AppError):
    """No catalogue, added or deleted item has this id (`GET /v1/items/{item_id}`)."""

    status_code = 404


class FleetUnavailable(AppError):
    """A reload could not be published to the other workers; this one changed nothing."""

    status_code = 503


class Unauthorized(AppError):
    status_code = 401
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class AdminDisabled(AppError):
    """ADMIN_TOKEN is empty: no token can be right, so the admin API is switched off."""

    status_code = 403


# Where in a request an input error lies, as pydantic's `loc`: ("body", "features", "age").
Loc = tuple[str | int, ...]


def input_error(loc: Loc, msg: str, value: Any, kind: str) -> dict[str, Any]:
    """One entry of a 422 `detail` list, shaped like pydantic's errors."""
    return {"type": kind, "loc": list(loc), "msg": msg, "input": value}


def too_long(loc: Loc, limit: int, length: int) -> dict[str, Any]:
    """A list longer than a run-time limit (MAX_HISTORY, MAX_BATCH...), worded as pydantic
    words its own static ones."""
    return input_error(loc, f"List should have at most {limit} items", length, "too_long")

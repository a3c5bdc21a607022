"""The model lifecycle: `ServingModel` (one version: load, verify, warm up, encode), the
`ModelRepository` holding the one serving reference (ready, swap), and `ModelSync`, which
keeps every worker on the fleet's version (the pin in `version_pin`).

Imports the service's foundation, `app.search` (the model's item index) and
`app.store.redis_client` (the pin's Redis client)."""

from app.model.history_cap_check import HistoryCapCheck
from app.model.repository import ModelHook, ModelRepository, Swap
from app.model.serving_model import ServingModel
from app.model.sync import ModelSync
from app.model.version_pin import LocalPin, RedisPin, VersionPin, build_pin

__all__ = [
    "HistoryCapCheck",
    "LocalPin",
    "ModelHook",
    "ModelRepository",
    "ModelSync",
    "RedisPin",
    "ServingModel",
    "Swap",
    "VersionPin",
    "build_pin",
]

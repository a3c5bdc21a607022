"""Helpers for the service tests: the app over HTTP through its lifespan, bundle variants, and
the brute-force reference recall; the redis-server launcher is the one the benchmarks use too
(`harness.procs.RedisServer`, re-exported here)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import torch
from fastapi import FastAPI

from app.http.fast_path import RecallFastPath
from app.main import create_app
from app.settings import Settings
from harness.procs import RedisServer, free_port  # noqa: F401 (re-exported)
from models import bundle as b
from models.features import FeatureEncoder
from models.tower_format import load_towers

ADMIN_TOKEN = "test-admin-token"


def make_settings(model_dir: Path, **overrides: Any) -> Settings:
    """Settings with every field a test depends on given explicitly (never the environment)."""
    values: dict[str, Any] = {
        "model_dir": model_dir,
        "redis_url": "",
        "admin_token": ADMIN_TOKEN,
        "index_type": "flat",
        "max_k": 500,
        "max_history": 200,
        "max_batch": 16,
        "history_cap": 100,
        "max_body_bytes": 64 * 1024,
        # Generous: a Redis call on a busy CI host may take tens of ms, and a timeout turns
        # it into a quiet fall-back to defaults. The tests about timeouts set their own.
        "redis_timeout_ms": 1000,
        "redis_retry_after_ms": 100,
        "cache_ttl_s": 2.0,
        "feature_ttl_s": 0,
        "reload_poll_s": 0,  # no watcher unless a test asks: reloads happen when a test says
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def lifespan(app: Any, wait_for_model: bool = True) -> AsyncIterator[None]:
    """Drive the app's ASGI lifespan protocol (startup, then shutdown), as a server does; the
    model loads in the background, and with `wait_for_model` the body starts once that load
    succeeded or failed, as a client waiting for readiness would."""
    to_app, app_inbox = anyio.create_memory_object_stream[dict[str, Any]](4)
    app_outbox, from_app = anyio.create_memory_object_stream[dict[str, Any]](4)
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    async with to_app, app_inbox, app_outbox, from_app, anyio.create_task_group() as tg:
        tg.start_soon(app, scope, app_inbox.receive, app_outbox.send)
        await to_app.send({"type": "lifespan.startup"})
        message = await from_app.receive()
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"startup failed: {message}")
        try:
            if wait_for_model:
                await app.state.services.sync.first_load()
            yield
        finally:
            await to_app.send({"type": "lifespan.shutdown"})
            message = await from_app.receive()
            assert message["type"] == "lifespan.shutdown.complete", message


@asynccontextmanager
async def serve(app_or_settings: FastAPI | Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app (one already built, or made from settings), started through its
    lifespan, with an HTTP client bound to it."""
    app = app_or_settings
    if not isinstance(app, FastAPI):
        app = create_app(app)
    async with lifespan(app), client_of(app) as client:
        yield client


def service_env(model_dir: Path, port: int, **settings: str) -> dict[str, str]:
    """The environment of a `python -m app` on loopback `port` serving `model_dir` with the
    embedded store; `settings` (e.g. `LOG_LEVEL="info"`) add to it or override it."""
    env = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "REDIS_URL": "",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_LEVEL": "warning",
    }
    return env | settings


def without_fast_path(app: FastAPI) -> FastAPI:
    """`app` with its plain-ASGI fast path for /v1/recall removed: every request routed."""
    assert any(m.cls is RecallFastPath for m in app.user_middleware)
    app.user_middleware = [m for m in app.user_middleware if m.cls is not RecallFastPath]
    return app


def client_of(app: FastAPI) -> httpx.AsyncClient:
    """An HTTP client bound to `app` (already started)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service")


def admin_headers(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def copy_version(
    root: Path,
    source: Path,
    name: str,
    mutate: Callable[[Path], None] | None = None,
    *,
    rehash: bool = True,
) -> Path:
    """Copy a bundle as version `name` of `root`, apply `mutate` to the copy, then (with
    `rehash`) rewrite the manifest so that only `mutate`'s own damage remains."""
    target = root / name
    shutil.copytree(source, target)
    manifest_path = target / b.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = name
    manifest_path.write_text(json.dumps(manifest))
    if mutate is not None:
        mutate(target)
    if rehash and manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        for file in b.BUNDLE_FILES:
            if (target / file).exists():
                manifest["sha256"][file] = b.sha256_file(target / file)
        manifest_path.write_text(json.dumps(manifest))
    return target


class Reference:
    """Exact recall computed independently of the service: the bundle's encoder and
    user tower, scores = user @ item_embeddings.T, seen items removed, top k."""

    def __init__(self, bundle_dir: Path) -> None:
        verified = b.verify_bundle(bundle_dir)
        self.version = verified.version
        self.item_ids = verified.item_ids
        self.embeddings = np.asarray(verified.item_embeddings)
        index = {item: row for row, item in enumerate(self.item_ids)}
        self.encoder = FeatureEncoder.from_json(verified.feature_spec, index)
        self.tower = load_towers(verified.path, verified.manifest).user

    def user_vector(self, features: Mapping[str, Any], history: Sequence[str]) -> np.ndarray:
        arrays = self.encoder.encode([features], [list(history)])
        with torch.no_grad():
            out = self.tower({k: torch.from_numpy(v) for k, v in arrays.items()})
        return out.numpy()[0]

    def top_k(
        self, features: Mapping[str, Any], history: Sequence[str], k: int, exclude_seen: bool = True
    ) -> list[tuple[str, float]]:
        scores = self.embeddings @ self.user_vector(features, history)
        seen = set(history) if exclude_seen else set()
        order = np.argsort(-scores, kind="stable")
        ranked = [(self.item_ids[i], float(scores[i])) for i in order]
        return [(item, score) for item, score in ranked if item not in seen][:k]


def assert_same_recall(items: list[dict[str, Any]], expected: list[tuple[str, float]]) -> None:
    assert [i["item_id"] for i in items] == [item for item, _ in expected]
    np.testing.assert_allclose([i["score"] for i in items], [s for _, s in expected], atol=1e-5)

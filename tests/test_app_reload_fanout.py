"""Reload fan-out (app/model/sync.py): replicas sharing a real Redis follow one pinned
version; the watcher loads a new LATEST, survives a bad one, and holds a pin while Redis is
down. In-process apps through their real lifespan; the same over real uvicorn worker processes
is in tests/test_smoke.py (WORKERS=2)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import anyio
import httpx
import pytest
from conftest import Bundles
from helpers_app import (
    RedisServer,
    admin_headers,
    copy_version,
    make_settings,
    serve,
)

from app.config import IndexConfig
from app.metrics import Metrics
from app.model import LocalPin, ModelRepository, ModelSync
from app.model import sync as model_sync
from models import bundle as b
from models.bundle import write_latest

pytestmark = [pytest.mark.anyio]

BAD_VERSION = "20991231T235959Z-bad0002"


def tamper_embeddings(path: Path) -> None:
    (path / b.ITEM_EMBEDDINGS).write_bytes(b"tampered")


async def ready(client: httpx.AsyncClient) -> dict[str, object]:
    response = await client.get("/health/ready")
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


async def eventually(client: httpx.AsyncClient, key: str, value: object) -> dict[str, object]:
    """The ready body once `key` has `value` (the watcher polls every 50 ms here)."""
    with anyio.fail_after(10):
        while (body := await ready(client))[key] != value:
            await anyio.sleep(0.02)
    return body


async def test_a_replica_serves_the_version_pinned_through_another(
    model_dir: Path, bundles: Bundles, redis_url: str, redis_prefix: str
) -> None:
    v1, v2 = bundles.v1.name, bundles.v2.name
    settings = make_settings(
        model_dir, redis_url=redis_url, redis_prefix=redis_prefix, reload_poll_s=0.05
    )
    async with serve(settings) as first:
        reload = await first.post("/admin/reload", json={"version": v2}, headers=admin_headers())
        assert reload.json() == {"model_version": v2, "previous_version": v1}
        # A replica started later reads the pin at start-up: v2, although LATEST names v1.
        async with serve(settings) as second:
            assert (await ready(second))["model_version"] == v2
            models = await second.get("/admin/models", headers=admin_headers())
            assert (models.json()["pinned"], models.json()["latest"]) == (v2, v1)
            # Unpinned through the second replica, the first one follows LATEST again.
            reload = await second.post("/admin/reload", headers=admin_headers())
            assert reload.json() == {"model_version": v1, "previous_version": v2}
            await eventually(first, "model_version", v1)


async def test_a_bad_new_version_is_tried_once_and_the_old_one_serves_on(
    model_dir: Path, bundles: Bundles
) -> None:
    copy_version(model_dir, bundles.v2, BAD_VERSION, tamper_embeddings, rehash=False)
    reason = f"bundle {BAD_VERSION} rejected: checksum mismatch for item_embeddings.npy"
    async with serve(make_settings(model_dir, reload_poll_s=0.05)) as client:
        write_latest(model_dir, BAD_VERSION)
        body = await eventually(client, "reload_error", reason)
        assert body["model_version"] == bundles.v1.name
        recall = await client.post("/v1/recall", json={"user_id": "u1", "k": 3})
        assert recall.json()["model_version"] == bundles.v1.name
        models = (await client.get("/admin/models", headers=admin_headers())).json()
        assert (models["active"], models["latest"]) == (bundles.v1.name, BAD_VERSION)
        assert models["reload_error"] == reason
        await anyio.sleep(0.5)  # ten more watcher steps: no retry of the same bad version
        metrics = (await client.get("/metrics")).text
        assert 'tower_recall_model_loads_total{outcome="rejected"} 1.0' in metrics
        # The next good version heals it.
        write_latest(model_dir, bundles.v2.name)
        body = await eventually(client, "model_version", bundles.v2.name)
        assert body["reload_error"] is None


async def test_a_failed_version_is_tried_again_after_the_back_off(
    model_dir: Path, bundles: Bundles, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A version whose files are still being copied when LATEST names it: the retry, once the
    # back-off has passed, serves it without anyone calling /admin/reload.
    monkeypatch.setattr(model_sync, "RETRY_FIRST_S", 1.0)
    target = copy_version(model_dir, bundles.v2, BAD_VERSION)
    manifest = (target / b.MANIFEST).read_bytes()
    (target / b.MANIFEST).unlink()
    async with serve(make_settings(model_dir, reload_poll_s=0.05)) as client:
        named_at = time.monotonic()  # the rejection comes after this, the retry 1 s after it
        write_latest(model_dir, BAD_VERSION)
        await eventually(
            client, "reload_error", f"bundle {BAD_VERSION} rejected: missing manifest.json"
        )
        (target / b.MANIFEST).write_bytes(manifest)  # the copy completes
        body = await eventually(client, "model_version", BAD_VERSION)
        assert body["reload_error"] is None
        assert time.monotonic() - named_at >= 1.0  # not retried at the next poll, 50 ms on
        metrics = (await client.get("/metrics")).text
        assert 'tower_recall_model_loads_total{outcome="rejected"} 1.0' in metrics


async def test_the_watcher_loads_the_first_bundle_without_a_call(
    tmp_path: Path, bundles: Bundles
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    async with serve(make_settings(empty, reload_poll_s=0.05)) as client:
        response = await client.get("/health/ready")
        assert response.status_code == 503
        assert response.json() == {"detail": f"no model loaded: no LATEST file in {empty}"}
        copy_version(empty, bundles.v1, bundles.v1.name)
        write_latest(empty, bundles.v1.name)
        with anyio.fail_after(10):
            while (await client.get("/health/ready")).status_code != 200:
                await anyio.sleep(0.02)


async def test_without_redis_a_pin_holds_in_this_process(model_dir: Path, bundles: Bundles) -> None:
    async with serve(make_settings(model_dir, reload_poll_s=0.05)) as client:
        body = {"version": bundles.v2.name}
        reload = await client.post("/admin/reload", json=body, headers=admin_headers())
        assert reload.status_code == 200
        await anyio.sleep(0.3)  # the watcher must not undo it although LATEST names v1
        assert (await ready(client))["model_version"] == bundles.v2.name
        await client.post("/admin/reload", headers=admin_headers())
        assert (await ready(client))["model_version"] == bundles.v1.name


async def test_with_redis_down_a_reload_changes_nothing_and_the_pin_holds(
    model_dir: Path, bundles: Bundles
) -> None:
    v1, v2 = bundles.v1.name, bundles.v2.name
    server = RedisServer().start()
    try:
        settings = make_settings(model_dir, redis_url=server.url, reload_poll_s=0.05)
        async with serve(settings) as client:
            reload = await client.post(
                "/admin/reload", json={"version": v2}, headers=admin_headers()
            )
            assert reload.status_code == 200
            server.kill()
            await anyio.sleep(0.3)  # the pin is unreadable: the last one known holds
            body = await ready(client)
            assert (body["model_version"], body["redis"]) == (v2, "unavailable")
            reload = await client.post(
                "/admin/reload", json={"version": v1}, headers=admin_headers()
            )
            assert reload.status_code == 503
            detail = reload.json()["detail"]
            assert detail.startswith("cannot publish the version to the other workers (")
            assert detail.endswith("); nothing changed")
            assert (await ready(client))["model_version"] == v2
    finally:
        server.stop()


class CancellationSwallowingPin(LocalPin):
    """Swallows every cancellation that lands while it is read, as Python 3.11's
    `asyncio.wait_for` does when the awaited call completes at that very moment."""

    def __init__(self) -> None:
        super().__init__()
        self.swallowed = 0

    async def get(self) -> str | None:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.swallowed += 1
        return await super().get()


async def test_shutdown_ends_the_watcher_even_when_its_cancellation_is_swallowed(
    model_dir: Path,
) -> None:
    repository = ModelRepository(model_dir, IndexConfig(), Metrics())
    pin = CancellationSwallowingPin()
    sync = ModelSync(repository, pin, poll_s=0.001)
    sync.start()
    await sync.first_load()
    watcher = sync._task
    assert watcher is not None
    await anyio.sleep(0.02)  # the watcher is reading the pin most of the time
    with anyio.fail_after(2):
        await sync.stop()
    assert watcher.done()
    assert pin.swallowed == 1

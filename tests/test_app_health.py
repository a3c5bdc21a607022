"""Liveness, readiness, metrics, OpenAPI; start-up with no or a bad bundle."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import anyio
import pytest
from conftest import Bundles
from helpers_app import admin_headers, client_of, lifespan, make_settings, serve

from app.config import IndexConfig
from app.main import create_app
from app.model import ServingModel

pytestmark = [pytest.mark.anyio]


async def test_ready_reports_model_and_embedded_store(model_dir: Path, bundles: Bundles) -> None:
    async with serve(make_settings(model_dir)) as client:
        assert (await client.get("/health/live")).json() == {"status": "alive"}
        response = await client.get("/health/ready")
        assert response.status_code == 200
        assert response.json() == {
            "model_version": bundles.v1.name,
            "n_items": 200,
            "index_type": "flat",
            "redis": "disabled",
            "worker": f"{socket.gethostname()}:{os.getpid()}",
            "reload_error": None,
        }


async def test_no_bundle_process_lives_but_is_not_ready(tmp_path: Path, bundles: Bundles) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    async with serve(make_settings(empty)) as client:
        assert (await client.get("/health/live")).status_code == 200
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json() == {"detail": f"no model loaded: no LATEST file in {empty}"}
        recall = await client.post("/v1/recall", json={"user_id": "u1"})
        assert recall.status_code == 503
        assert recall.json() == ready.json()
        # Ingestion goes on without a model: features are stored unchecked.
        put = await client.put("/v1/users/u1/features", json={"features": {"anything": 1}})
        assert put.status_code == 200
        events = await client.post("/v1/users/u1/events", json={"item_ids": ["i1"]})
        assert events.json() == {"user_id": "u1", "history_length": 1}
        # An item put needs the model's item tower to embed it; a delete does not.
        item = await client.put("/v1/items/new-1", json={"attributes": {}}, headers=admin_headers())
        assert item.status_code == 503 and item.json() == ready.json()
        gone = await client.delete("/v1/items/i1", headers=admin_headers())
        assert gone.status_code == 200
        assert (gone.json()["status"], gone.json()["model_version"]) == ("deleted", None)
        # Once a bundle appears, a reload makes the service ready without a restart.
        import shutil

        from models.bundle import write_latest

        shutil.copytree(bundles.v1, empty / bundles.v1.name)
        write_latest(empty, bundles.v1.name)
        reload = await client.post("/admin/reload", headers=admin_headers())
        assert reload.json() == {"model_version": bundles.v1.name, "previous_version": None}
        assert (await client.get("/health/ready")).status_code == 200
        served = await client.get("/v1/items/i1")  # the bundle holds i1: the delete hides it
        assert (served.json()["status"], served.json()["model_version"]) == (
            "deleted",
            bundles.v1.name,
        )
        everything = {"user_id": "u2", "k": 500, "exclude_seen": False}
        items = (await client.post("/v1/recall", json=everything)).json()["items"]
        assert len(items) == 199 and "i1" not in {i["item_id"] for i in items}  # of 200


async def test_bad_bundle_at_start_up_is_not_served(model_dir: Path, bundles: Bundles) -> None:
    (model_dir / bundles.v1.name / "item_embeddings.npy").write_bytes(b"tampered")
    async with serve(make_settings(model_dir)) as client:
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json() == {
            "detail": f"no model loaded: bundle {bundles.v1.name} rejected: "
            "checksum mismatch for item_embeddings.npy"
        }


async def test_probes_answer_while_the_first_bundle_loads(
    model_dir: Path, bundles: Bundles, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A big index takes minutes to build: meanwhile the worker must answer its probes (an
    # orchestrator would otherwise restart it mid-build, again and again).
    gate = threading.Event()

    load = ServingModel.load

    def held_load(path: Path, config: IndexConfig) -> ServingModel:
        gate.wait(10)
        return load(path, config)

    monkeypatch.setattr(ServingModel, "load", staticmethod(held_load))
    app = create_app(make_settings(model_dir))
    async with lifespan(app, wait_for_model=False), client_of(app) as client:
        assert (await client.get("/health/live")).status_code == 200
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json() == {"detail": "no model loaded yet"}
        assert (await client.post("/v1/recall", json={"user_id": "u1"})).status_code == 503
        assert (await client.get("/metrics")).status_code == 200
        gate.set()
        with anyio.fail_after(10):
            await app.state.services.sync.first_load()
        ready = await client.get("/health/ready")
        assert ready.status_code == 200 and ready.json()["model_version"] == bundles.v1.name


async def test_unreadable_latest_leaves_the_process_up_not_ready(tmp_path: Path) -> None:
    (tmp_path / "LATEST").mkdir()  # reading it fails with an OSError, even as root
    async with serve(make_settings(tmp_path)) as client:
        assert (await client.get("/health/live")).status_code == 200
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["detail"].startswith("no model loaded: cannot read LATEST: ")
        models = await client.get("/admin/models", headers=admin_headers())
        assert models.status_code == 200 and models.json()["latest"] is None
        reload = await client.post("/admin/reload", headers=admin_headers())
        assert reload.status_code == 404
        assert reload.json()["detail"].startswith("cannot read LATEST: IsADirectoryError")


async def test_a_client_gone_before_its_body_is_no_server_error(model_dir: Path) -> None:
    app = create_app(make_settings(model_dir))
    async with lifespan(app):
        sent: list[dict[str, object]] = []

        async def disconnect() -> dict[str, object]:
            return {"type": "http.disconnect"}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/recall",
            "raw_path": b"/v1/recall",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"20")],
            "client": ("127.0.0.1", 50000),
            "server": ("service", 80),
            "app": app,
        }
        await app(scope, disconnect, send)
        assert sent == []  # nobody to answer
        async with client_of(app) as client:
            metrics = (await client.get("/metrics")).text
        counted = 'tower_recall_http_requests_total{method="POST",route="/v1/recall",status='
        assert counted + '"499"} 1.0' in metrics
        assert counted + '"500"}' not in metrics


async def test_metrics_expose_routes_stages_model_and_cache(
    model_dir: Path, bundles: Bundles
) -> None:
    async with serve(make_settings(model_dir)) as client:
        await client.post("/v1/recall", json={"user_id": "u1", "k": 5})
        await client.post("/v1/recall", json={"user_id": "u1", "k": 0})
        await client.post("/v1/users/u1/events", json={"item_ids": ["i1"]})
        for method in ("PROPFIND", "PURGE", "MKCOL"):  # one "other" series, not one each
            await client.request(method, "/v1/recall")
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for line in (
        'tower_recall_http_requests_total{method="POST",route="/v1/recall",status="200"} 1.0',
        'tower_recall_http_requests_total{method="POST",route="/v1/recall",status="422"} 1.0',
        'tower_recall_http_requests_total{method="POST",route="/v1/users/{user_id}/events",'
        'status="200"} 1.0',
        f'tower_recall_model_info{{version="{bundles.v1.name}"}} 1.0',
        "tower_recall_model_items 200.0",
        'tower_recall_model_loads_total{outcome="loaded"} 1.0',
        'tower_recall_stage_duration_seconds_count{stage="encode"} 1.0',
        'tower_recall_stage_duration_seconds_count{stage="search"} 1.0',
        'tower_recall_stage_duration_seconds_count{stage="feature_fetch"} 1.0',
        'tower_recall_feature_source_total{source="default"} 1.0',
        'tower_recall_http_requests_total{method="other",route="/v1/recall",status="405"} 3.0',
    ):
        assert line in text, line
    assert "PROPFIND" not in text
    assert 'tower_recall_http_request_duration_seconds_bucket{le="0.005",method="POST",' in text


async def test_openapi_documents_every_route_with_models(model_dir: Path) -> None:
    async with serve(make_settings(model_dir)) as client:
        doc = (await client.get("/openapi.json")).json()
    paths = doc["paths"]
    expected = {
        ("/v1/recall", "post"): "RecallResponse",
        ("/v1/recall/batch", "post"): "BatchRecallResponse",
        ("/v1/users/{user_id}/events", "post"): "EventsResponse",
        ("/v1/users/{user_id}/features", "put"): "FeaturesResponse",
        ("/health/live", "get"): "LiveResponse",
        ("/health/ready", "get"): "ReadyResponse",
        ("/admin/reload", "post"): "ReloadResponse",
        ("/admin/models", "get"): "ModelsResponse",
    }
    for (path, method), model in expected.items():
        ok = paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{model}"}, path
    assert "/metrics" in paths
    assert paths["/admin/reload"]["post"]["security"] == [{"HTTPBearer": []}]
    assert set(paths["/admin/reload"]["post"]["responses"]) >= {"200", "401", "404", "409", "422"}
    schemas = doc["components"]["schemas"]
    assert schemas["RecallRequest"]["examples"]
    # Limits from settings (make_settings: MAX_K 500, MAX_HISTORY 200, MAX_BATCH 16).
    assert schemas["RecallRequest"]["properties"]["k"]["anyOf"][0]["maximum"] == 500
    assert schemas["RecallRequest"]["properties"]["history"]["anyOf"][0]["maxItems"] == 200
    assert schemas["BatchRecallRequest"]["properties"]["requests"]["maxItems"] == 16
    assert schemas["EventsRequest"]["properties"]["item_ids"]["maxItems"] == 200

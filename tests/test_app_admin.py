"""Admin API: bearer auth, hot reload (good, bad, concurrent), version names, model listing."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest
import torch
from conftest import Bundles
from helpers_app import (
    ADMIN_TOKEN,
    admin_headers,
    copy_version,
    lifespan,
    make_settings,
    serve,
)
from safetensors.torch import load_file, save_file

from app.main import create_app
from app.model import ServingModel
from app.model.history_cap_check import HistoryCapCheck
from app.model.repository import ModelRepository
from models import bundle as b
from models.features import FeatureEncoder

pytestmark = [pytest.mark.anyio]

BAD_VERSION = "20991231T235959Z-bad0001"


async def active_version(client: httpx.AsyncClient) -> str:
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    version: str = ready.json()["model_version"]
    recall = await client.post("/v1/recall", json={"user_id": "u1", "k": 3})
    assert recall.status_code == 200 and recall.json()["model_version"] == version
    return version


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "missing bearer token"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing bearer token"),
        ({"Authorization": "Bearer wrong"}, "invalid bearer token"),
        ({"Authorization": f"Bearer {ADMIN_TOKEN}x"}, "invalid bearer token"),
        # Non-ASCII bytes: compare_digest must not raise on them.
        ({b"Authorization": "Bearer tökén".encode()}, "invalid bearer token"),
    ],
)
async def test_admin_requires_the_token(
    model_dir: Path, headers: Mapping[str, str] | Mapping[bytes, bytes], detail: str
) -> None:
    async with serve(make_settings(model_dir)) as client:
        for response in (
            await client.post("/admin/reload", headers=headers),
            await client.get("/admin/models", headers=headers),
        ):
            assert response.status_code == 401
            assert response.json() == {"detail": detail}
            assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("token", ["", "   "])  # blank: no client could ever present it
async def test_admin_disabled_without_a_token(model_dir: Path, token: str) -> None:
    async with serve(make_settings(model_dir, admin_token=token)) as client:
        response = await client.post("/admin/reload", headers={"Authorization": "Bearer "})
        assert response.status_code == 403
        assert response.json() == {"detail": "admin API disabled: ADMIN_TOKEN is not set"}


async def test_a_token_with_spaces_around_it_authenticates(model_dir: Path) -> None:
    settings = make_settings(model_dir, admin_token=" a-long-enough-token-0123 ")
    async with serve(settings) as client:
        headers = {"Authorization": "Bearer a-long-enough-token-0123"}
        assert (await client.get("/admin/models", headers=headers)).status_code == 200


@pytest.mark.parametrize("token", ["change-me", "tiny-tok"])
async def test_a_guessable_admin_token_is_warned_about_at_start(
    model_dir: Path, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(make_settings(model_dir, admin_token=token)):
        pass
    warned = [r.getMessage() for r in caplog.records if "ADMIN_TOKEN is" in r.getMessage()]
    assert len(warned) == 1 and "set a long random one" in warned[0]
    assert token not in warned[0]  # the token itself is never logged


async def test_a_reload_waiting_on_latest_leaves_the_service_answering(
    model_dir: Path, bundles: Bundles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung volume under MODEL_DIR: `POST /admin/reload` read LATEST on the event loop, so
    no other request was answered until the read returned (the watcher read it in a thread)."""
    released = threading.Event()
    read_latest = ModelRepository.read_latest

    def hung(repository: ModelRepository) -> str:
        if not released.wait(10):
            raise AssertionError("LATEST was read on the event loop: nothing else was served")
        return read_latest(repository)

    async with serve(make_settings(model_dir)) as client:
        assert await active_version(client) == bundles.v1.name
        monkeypatch.setattr(ModelRepository, "read_latest", hung)
        reload = asyncio.create_task(client.post("/admin/reload", headers=admin_headers()))
        await asyncio.sleep(0.2)  # the reload is under way, waiting on LATEST
        live = await client.get("/health/live")
        released.set()
        assert live.status_code == 200
        response = await reload
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == bundles.v1.name


async def test_models_lists_versions_active_and_latest(model_dir: Path, bundles: Bundles) -> None:
    async with serve(make_settings(model_dir)) as client:
        response = await client.get("/admin/models", headers=admin_headers())
    assert response.status_code == 200
    assert response.json() == {
        "active": bundles.v1.name,
        "latest": bundles.v1.name,
        "pinned": None,
        "reload_error": None,
        "versions": sorted([bundles.v1.name, bundles.v2.name]),
    }


async def test_reload_to_another_version_and_back_to_latest(
    model_dir: Path, bundles: Bundles
) -> None:
    async with serve(make_settings(model_dir)) as client:
        assert await active_version(client) == bundles.v1.name
        response = await client.post(
            "/admin/reload", json={"version": bundles.v2.name}, headers=admin_headers()
        )
        assert response.status_code == 200
        assert response.json() == {
            "model_version": bundles.v2.name,
            "previous_version": bundles.v1.name,
        }
        assert await active_version(client) == bundles.v2.name
        # No body: what LATEST names (v1).
        response = await client.post("/admin/reload", headers=admin_headers())
        assert response.json() == {
            "model_version": bundles.v1.name,
            "previous_version": bundles.v2.name,
        }
        models = (await client.get("/admin/models", headers=admin_headers())).json()
        assert models["active"] == bundles.v1.name
        metrics = (await client.get("/metrics")).text
        assert f'tower_recall_model_info{{version="{bundles.v1.name}"}} 1.0' in metrics
        assert bundles.v2.name not in metrics.split("tower_recall_model_info", 1)[1].split("#")[0]


async def test_requests_during_reload_never_fail(model_dir: Path, bundles: Bundles) -> None:
    versions: list[str] = []

    async with serve(make_settings(model_dir)) as client:

        async def recall(n: int) -> None:
            response = await client.post("/v1/recall", json={"user_id": f"u{n}", "k": 10})
            assert response.status_code == 200
            versions.append(response.json()["model_version"])

        reloaded = anyio.Event()

        async def reload() -> None:
            body = {"version": bundles.v2.name}
            response = await client.post("/admin/reload", json=body, headers=admin_headers())
            assert response.status_code == 200
            reloaded.set()

        async with anyio.create_task_group() as tg:
            n = 0
            # Requests keep coming until the reload is done, and a few after: the swap lands
            # in the middle of the traffic, however long the load takes.
            while n < 40 or not reloaded.is_set():
                tg.start_soon(recall, n)
                if n == 10:
                    tg.start_soon(reload)
                n += 1
                await anyio.sleep(0.001)
            for _ in range(5):
                tg.start_soon(recall, n)
                n += 1
        assert await active_version(client) == bundles.v2.name
    assert len(versions) == n
    assert set(versions) == {bundles.v1.name, bundles.v2.name}


def tamper_embeddings(path: Path) -> None:
    emb = np.load(path / b.ITEM_EMBEDDINGS)
    emb[0, 0] += 0.5
    np.save(path / b.ITEM_EMBEDDINGS, emb)


def drop_manifest(path: Path) -> None:
    (path / b.MANIFEST).unlink()


def widen_embeddings(path: Path) -> None:
    """Consistent files and manifest, but one more dimension than the tower outputs."""
    emb = np.load(path / b.ITEM_EMBEDDINGS)
    wide = np.hstack([emb, np.zeros((emb.shape[0], 1), dtype=np.float32)])
    np.save(path / b.ITEM_EMBEDDINGS, wide)
    manifest = json.loads((path / b.MANIFEST).read_text())
    manifest["embedding_dim"] = wide.shape[1]
    (path / b.MANIFEST).write_text(json.dumps(manifest))


def garble_tower(path: Path) -> None:
    (path / b.TOWERS_WEIGHTS).write_bytes(b"not a safetensors file")


def nan_tower(path: Path) -> None:
    """Every weight NaN: the towers load, and give no numbers."""
    weights = load_file(path / b.TOWERS_WEIGHTS)
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in weights.items()}, path / b.TOWERS_WEIGHTS
    )


def nest_item_ids(path: Path) -> None:
    ids = json.loads((path / b.ITEM_IDS).read_text())
    (path / b.ITEM_IDS).write_text(json.dumps([[i] for i in ids]))


def grow_catalogue(path: Path) -> None:
    """Consistent files and manifest, but one item more than the tower's history table knows:
    only a user whose history holds that item would reach the missing row."""
    emb = np.load(path / b.ITEM_EMBEDDINGS)
    np.save(path / b.ITEM_EMBEDDINGS, np.vstack([emb, emb[:1]]))
    ids = json.loads((path / b.ITEM_IDS).read_text())
    (path / b.ITEM_IDS).write_text(json.dumps([*ids, "brand-new-item"]))
    manifest = json.loads((path / b.MANIFEST).read_text())
    manifest["n_items"] = len(ids) + 1
    (path / b.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("mutate", "rehash", "reason"),
    [
        (tamper_embeddings, False, "checksum mismatch for item_embeddings.npy"),
        (drop_manifest, False, "missing manifest.json"),
        (widen_embeddings, True, "user tower returns shape (1, {dim}), item embeddings have dim"),
        (garble_tower, True, "towers.safetensors cannot be loaded"),
        (nan_tower, True, "towers.safetensors holds non-finite weights: "),
        (nest_item_ids, True, "item_ids.json must be a list of 200 string ids"),
        (grow_catalogue, True, "towers record for 200 items, the bundle has 201"),
    ],
    ids=[
        "tampered",
        "no-manifest",
        "wrong-dim",
        "garbled-tower",
        "nan-tower",
        "nested-ids",
        "grown-catalogue",
    ],
)
async def test_bad_bundle_is_refused_and_old_keeps_serving(
    model_dir: Path,
    bundles: Bundles,
    mutate: Callable[[Path], None],
    rehash: bool,
    reason: str,
) -> None:
    copy_version(model_dir, bundles.v2, BAD_VERSION, mutate, rehash=rehash)
    dim = np.load(bundles.v1 / b.ITEM_EMBEDDINGS, mmap_mode="r").shape[1]
    async with serve(make_settings(model_dir)) as client:
        body = {"version": BAD_VERSION}
        response = await client.post("/admin/reload", json=body, headers=admin_headers())
        assert response.status_code == 409
        detail = response.json()["detail"]
        assert detail.startswith(f"bundle {BAD_VERSION} rejected: ")
        assert reason.format(dim=dim) in detail
        assert await active_version(client) == bundles.v1.name
        metrics = (await client.get("/metrics")).text
        assert 'tower_recall_model_loads_total{outcome="rejected"} 1.0' in metrics


@pytest.mark.parametrize("where", ["load", "hook"])
async def test_an_unforeseen_load_failure_is_refused_and_old_keeps_serving(
    model_dir: Path, bundles: Bundles, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Whether loading the bundle or a model hook after it fails (a hook's failure answered
    500 and left the watcher reloading every poll, with no back-off and no reason shown)."""

    def out_of_memory(*args: object) -> ServingModel:
        raise MemoryError("cannot allocate the search copies")

    async with serve(make_settings(model_dir)) as client:
        if where == "load":
            monkeypatch.setattr(ServingModel, "load", staticmethod(out_of_memory))
        else:
            monkeypatch.setattr(HistoryCapCheck, "prepare", out_of_memory)
        body = {"version": bundles.v2.name}
        response = await client.post("/admin/reload", json=body, headers=admin_headers())
        assert response.status_code == 409
        assert response.json() == {
            "detail": f"bundle {bundles.v2.name} rejected: "
            "MemoryError: cannot allocate the search copies"
        }
        assert await active_version(client) == bundles.v1.name
        metrics = (await client.get("/metrics")).text
        assert 'tower_recall_model_loads_total{outcome="rejected"} 1.0' in metrics


async def test_a_manifest_without_its_training_record_still_serves(
    model_dir: Path, bundles: Bundles
) -> None:
    """The manifest's `model` record (how it was trained) is informational: a bundle whose
    record is null loads, also where the HISTORY_CAP check reads it (it raised there)."""
    item_ids = json.loads((bundles.v2 / b.ITEM_IDS).read_text())
    reads = FeatureEncoder.load(bundles.v2 / b.FEATURE_SPEC, item_ids).history_length
    assert reads > 1

    def drop_record(bundle: Path) -> None:
        manifest = json.loads((bundle / b.MANIFEST).read_text())
        manifest["model"] = None
        (bundle / b.MANIFEST).write_text(json.dumps(manifest))

    copy_version(model_dir, bundles.v2, BAD_VERSION, drop_record)
    async with serve(make_settings(model_dir, history_cap=max(1, reads - 1))) as client:
        body = {"version": BAD_VERSION}
        response = await client.post("/admin/reload", json=body, headers=admin_headers())
        assert response.status_code == 200, response.text
        assert await active_version(client) == BAD_VERSION


async def test_a_shared_index_cache_keeps_the_versions_model_dir_holds(
    model_dir: Path, bundles: Bundles, tmp_path: Path
) -> None:
    """INDEX_CACHE_DIR held a built index per version ever served (~0.5 GB each at 1M
    items), long after MODEL_DIR had dropped the version."""
    cache = tmp_path / "index-cache"
    (cache / "not-a-version").mkdir(parents=True)  # anything else there is left alone
    settings = make_settings(model_dir, index_type="hnsw", index_cache_dir=cache)
    async with serve(settings) as client:
        assert (cache / bundles.v1.name).is_dir()
        b.write_latest(model_dir, bundles.v2.name)
        shutil.rmtree(model_dir / bundles.v1.name)  # a retention policy drops the old one
        reload = await client.post("/admin/reload", headers=admin_headers())
        assert reload.json()["model_version"] == bundles.v2.name
    assert sorted(p.name for p in cache.iterdir()) == sorted([bundles.v2.name, "not-a-version"])


async def test_latest_is_never_quoted_to_clients(model_dir: Path, tmp_path: Path) -> None:
    """LATEST linked to another file (here one holding secrets) had its content quoted in the
    readiness answer any client reads, and read whole whatever its size."""
    secret = tmp_path / "environ"
    secret.write_bytes(b"ADMIN_TOKEN=s3cret\x00REDIS_URL=redis://:pw@host/0\x00" * 10_000)
    (model_dir / "LATEST").unlink()
    (model_dir / "LATEST").symlink_to(secret)
    async with serve(make_settings(model_dir)) as client:  # after the start-up load failed
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["detail"].endswith("LATEST does not hold a version name")
        assert "s3cret" not in ready.text and "pw@" not in ready.text


async def test_unknown_version_is_404(model_dir: Path) -> None:
    async with serve(make_settings(model_dir)) as client:
        body = {"version": "20000101T000000Z-abcdef"}
        response = await client.post("/admin/reload", json=body, headers=admin_headers())
        assert response.status_code == 404
        assert response.json() == {
            "detail": "no bundle version '20000101T000000Z-abcdef' in MODEL_DIR"
        }


async def test_the_serving_version_gone_from_model_dir_is_404_and_not_pinned(
    model_dir: Path, bundles: Bundles
) -> None:
    # Asked for the version it serves, the worker answered 200 without looking and pinned, for
    # the whole fleet, a version that no worker started later could load.
    async with serve(make_settings(model_dir)) as client:
        shutil.rmtree(model_dir / bundles.v1.name)
        for body in ({"version": bundles.v1.name}, None):  # by name, or as what LATEST names
            response = await client.post("/admin/reload", json=body, headers=admin_headers())
            assert response.status_code == 404, response.text
            assert response.json() == {
                "detail": f"no bundle version '{bundles.v1.name}' in MODEL_DIR"
            }
        models = (await client.get("/admin/models", headers=admin_headers())).json()
        assert (models["active"], models["pinned"]) == (bundles.v1.name, None)
        recall = await client.post("/v1/recall", json={"user_id": "u1", "k": 3})
        assert recall.json()["model_version"] == bundles.v1.name  # still serving


@pytest.mark.parametrize(
    "version",
    [
        "../outside/20261122T113000Z-3f9a1c",
        "..",
        "/etc",
        "..%2f..%2fetc%2fpasswd",
        "20261122T113000Z-3f9a1c/../../outside",
        "20261122T113000Z-3f9a1c\n",
        "",
        "LATEST",
    ],
)
async def test_version_names_never_escape_model_dir(
    model_dir: Path, bundles: Bundles, version: str
) -> None:
    # A perfectly good bundle right outside MODEL_DIR must stay out of reach.
    copy_version(model_dir.parent / "outside", bundles.v2, "20261122T113000Z-3f9a1c")
    async with serve(make_settings(model_dir)) as client:
        response = await client.post(
            "/admin/reload", json={"version": version}, headers=admin_headers()
        )
        assert response.status_code == 422
        assert response.json() == {
            "detail": [
                {
                    "type": "invalid_version",
                    "loc": ["body", "version"],
                    "msg": f"invalid version name {version!r}",
                    "input": version,
                }
            ]
        }
        assert await active_version(client) == bundles.v1.name


async def test_reload_body_must_be_well_formed(model_dir: Path) -> None:
    async with serve(make_settings(model_dir)) as client:
        for body in ({"version": 5}, {"versoin": "x"}, ["x"]):
            response = await client.post("/admin/reload", json=body, headers=admin_headers())
            assert response.status_code == 422, body


async def test_loaded_heap_is_frozen_and_a_replaced_bundle_still_freed(
    model_dir: Path, bundles: Bundles
) -> None:
    """The heap at each swap leaves the collector's full passes (over torch, FAISS and a 1M-item
    bundle one took ~140 ms: the p99 tail), yet the bundle a reload replaces is released."""
    gc.unfreeze()
    app = create_app(make_settings(model_dir))
    try:
        async with lifespan(app):
            repository = app.state.services.repository
            first = weakref.ref(repository.require())
            assert gc.get_freeze_count() > 0
            assert not any(o is first() for o in gc.get_objects())  # frozen: never scanned
            second = await repository.load(bundles.v2.name)
            gc.disable()  # what frees it must be reference counting: frozen cycles never are
            repository.swap(second)  # the Swap it returns, holding `previous`, is dropped
            assert first() is None
    finally:
        gc.enable()
        gc.unfreeze()

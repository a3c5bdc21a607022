"""Item changes over two real uvicorn workers sharing a real Redis (`python -m app`,
WORKERS=2): both serve an added item and hide a deleted one, through a reload and a restart.
In process: tests/test_app_items.py."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from helpers_app import ADMIN_TOKEN, admin_headers, free_port, service_env
from helpers_items import ItemBundles, kind_of, model_dir_of, trained_item_bundles
from helpers_process import Processes, get, wait_all_workers, wait_for, wait_ready
from helpers_stack import ROOT

from app import workers

ADMIN = admin_headers()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not workers.SUPPORTED, reason="SO_REUSEPORT balancing: Linux"),
]


@pytest.fixture(scope="module")
def item_bundles(tmp_path_factory: pytest.TempPathFactory) -> ItemBundles:
    return trained_item_bundles(tmp_path_factory)


@pytest.fixture
def item_model_dir(tmp_path: Path, item_bundles: ItemBundles) -> Path:
    return model_dir_of(tmp_path / "artifacts", item_bundles)


def http_state(base: str, item_id: str) -> tuple[str, str, str | None] | None:
    """(worker, status, model_version) of a GET on a fresh connection; None if refused."""
    response = get(f"{base}/v1/items/{item_id}")
    if response is None or response.status_code != 200:
        return None
    body = response.json()
    return body["worker"], body["status"], body["model_version"]


def both_workers_serve(base: str, want: dict[str, str], version: str) -> None:
    """Until each item of `want` has its status on `version` in two distinct workers."""
    for item_id, status in want.items():
        wait_for(
            _in_both(base, item_id, status, version),
            30,
            f"{item_id} {status} on {version} in both workers",
        )


def _in_both(base: str, item_id: str, status: str, version: str) -> Callable[[], bool | None]:
    seen: set[str] = set()

    def probe() -> bool | None:
        found = http_state(base, item_id)
        if found is not None and found[1:] == (status, version):
            seen.add(found[0])
        return True if len(seen) == 2 else None

    return probe


def recalled(base: str, history: list[str], k: int) -> list[str]:
    body = {"user_id": "u-fleet", "k": k, "history": history}
    response = httpx.post(f"{base}/v1/recall", json=body, timeout=10)
    assert response.status_code == 200, response.text
    return [item["item_id"] for item in response.json()["items"]]


def test_two_workers_serve_item_changes_through_reloads_and_a_restart(
    procs: Processes,
    item_model_dir: Path,
    item_bundles: ItemBundles,
    redis_url: str,
    redis_prefix: str,
) -> None:
    v1, v2 = item_bundles.v1.name, item_bundles.v2.name
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = service_env(
        item_model_dir, port, WORKERS="2", REDIS_URL=redis_url, REDIS_PREFIX=redis_prefix,
        RELOAD_POLL_S="0.2", ADMIN_TOKEN=ADMIN_TOKEN,
        SHUTDOWN_TIMEOUT_S="2",
    )  # fmt: skip
    start = [sys.executable, "-m", "app"]
    proc = procs.start(start, env, ROOT, "app")
    wait_all_workers(base, v1, 2, 120)
    kind = kind_of(item_bundles.dataset, "c0")
    added = httpx.put(f"{base}/v1/items/new-1", json={"attributes": kind.like}, headers=ADMIN)
    assert added.json()["status"] == "added", added.text
    victim = next(item for item in recalled(base, kind.history, 5) if item != "new-1")
    assert httpx.delete(f"{base}/v1/items/{victim}", headers=ADMIN).status_code == 200

    def check(version: str, k: int) -> None:
        both_workers_serve(base, {"new-1": "added", victim: "deleted"}, version)
        for _ in range(10):  # fresh connections: both workers answer some
            found = recalled(base, kind.history, k)
            assert "new-1" in found and victim not in found

    check(v1, 50)  # among the user's top 50 of 200
    reload = httpx.post(f"{base}/admin/reload", json={"version": v2}, headers=ADMIN)
    assert reload.status_code == 200, reload.text
    wait_all_workers(base, v2, 2, 60)
    check(v2, 250)
    assert proc.stop() == 0
    proc = procs.start(start, env, ROOT, "app")  # replays the log, follows the pin
    wait_ready(base, 120, proc)
    wait_all_workers(base, v2, 2, 60)
    check(v2, 250)

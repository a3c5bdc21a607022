"""`python -m app`: a real uvicorn process on a real socket, configured from the environment."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import Bundles
from helpers_app import free_port, service_env

from models.bundle import write_latest

ROOT = Path(__file__).resolve().parents[1]


def test_python_m_app_starts_without_a_bundle_then_serves_one(
    tmp_path: Path, bundles: Bundles
) -> None:
    model_dir = tmp_path / "artifacts"  # does not exist yet: importing and starting must cope
    port = free_port()
    env = service_env(model_dir, port, ADMIN_TOKEN="s3cret")
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                live = httpx.get(f"{base}/health/live", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "service did not start"
                time.sleep(0.2)
        assert live.json() == {"status": "alive"}
        assert httpx.get(f"{base}/health/ready").status_code == 503

        shutil.copytree(bundles.v1, model_dir / bundles.v1.name)
        write_latest(model_dir, bundles.v1.name)
        auth = {"Authorization": "Bearer s3cret"}
        reload = httpx.post(f"{base}/admin/reload", headers=auth, timeout=30)
        assert reload.json() == {"model_version": bundles.v1.name, "previous_version": None}
        recall = httpx.post(f"{base}/v1/recall", json={"user_id": "u1", "k": 3}, timeout=5)
        assert recall.status_code == 200 and len(recall.json()["items"]) == 3
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def test_python_m_app_names_each_invalid_setting_and_exits(tmp_path: Path) -> None:
    env = service_env(tmp_path, free_port(), MAX_HISTORY="20000", WORKERS="0")
    # A cluster with a database number failed only in the lifespan, with a traceback.
    env |= {"INDEX_TYPE": "annoy", "REDIS_URL": "redis://127.0.0.1:6379/11", "REDIS_CLUSTER": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("python -m app: invalid settings\n")
    for line in (
        "MAX_HISTORY: Input should be less than or equal to 10000",
        "WORKERS",
        "INDEX_TYPE",
        "REDIS_CLUSTER: Value error, a Redis Cluster is reached over TCP",
    ):
        assert line in done.stderr, done.stderr


def test_python_m_app_lists_its_settings_and_refuses_arguments() -> None:
    """`--help` started a server on port 8000; an option (`--port 80`) was ignored."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "app", *args]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)

    done = run("--help")
    assert done.returncode == 0, done.stderr
    assert "MODEL_DIR=artifacts" in done.stdout and "REDIS_CLUSTER=false" in done.stdout
    done = run("--port", "80")
    assert done.returncode == 2 and "unrecognized arguments: --port 80" in done.stderr

"""The stack's exact commands, run natively as compose and the image run them (no Docker engine
here): Redis -> trainer (train + publish-features) -> service with two worker processes ->
recall over HTTP -> a second trainer run, reloads and a pinned rollback reaching every worker,
with no failed request. And `make run`'s script on embedded defaults.

Commands, environment, CMD and healthchecks are read from docker-compose.yml and the Dockerfile,
so a broken command there fails here. What Docker itself would supply is mapped explicitly: the
`artifacts` volume is a temp dir, the `redis` host is 127.0.0.1:<free port>, the port is free.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from helpers_app import free_port
from helpers_process import Proc, Processes, get, wait_all_workers, wait_for, wait_ready
from helpers_stack import ROOT, compose, image_runtime, service_command, service_environment

from models.bundle import read_latest

# Stands for `.env`: a tiny world and a short training, so the test stays fast.
VARIABLES = {
    "TRAIN_DATA": "synthetic:seed=1,users=300,items=200",
    "TRAIN_ARGS": "--epochs 1 --batch-size 256 --field-dim 16 --hidden 64 --out-dim 32",
    "ADMIN_TOKEN": "smoke-token",
    "WORKERS": "2",  # a reload must reach every worker process, not only the one called
}
# Settings the developer's shell may hold; each process here gets only what the stack gives.
SERVICE_VARIABLES = {
    "REDIS_URL",
    "REDIS_PREFIX",
    "MODEL_DIR",
    "INDEX_CACHE_DIR",
    "ADMIN_TOKEN",
    "WORKERS",
    "PORT",
}


@dataclass(frozen=True)
class MakeRun:
    proc: Proc
    base: str
    artifacts: Path


@pytest.fixture(scope="module")
def make_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeRun]:
    """`scripts/run.sh` (what `make run` runs) on embedded defaults, with tiny training data.
    The compose test asks for it too, so that it starts first: its single-threaded training
    overlaps the compose test's own, which saves most of its time on a two-core CI box."""
    tmp = tmp_path_factory.mktemp("make-run")
    port = free_port()
    env = host_env() | {
        "TRAIN_DATA": VARIABLES["TRAIN_DATA"],
        "TRAIN_ARGS": VARIABLES["TRAIN_ARGS"],
        "MODEL_DIR": str(tmp / "artifacts"),
        "PORT": str(port),
        "HOST": "127.0.0.1",
    }
    group = Processes(tmp / "logs")
    proc = group.start([str(ROOT / "scripts" / "run.sh")], env, tmp, "run")
    try:
        yield MakeRun(proc, f"http://127.0.0.1:{port}", tmp / "artifacts")
    finally:
        group.stop_all()


def host_env() -> dict[str, str]:
    """This machine's environment without the service's settings. One math thread: the
    models are tiny, and on a busy CI box extra threads only contend (several times slower)."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    return env | {"OMP_NUM_THREADS": "1"}


def base_env() -> dict[str, str]:
    """The image's environment on this machine: its ENV, and the venv's `python` first."""
    env = host_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env | image_runtime().env


def container_env(service: str, redis_port: int, artifacts: Path) -> dict[str, str]:
    env = base_env() | service_environment(service, VARIABLES)
    # What Docker supplies: the volumes' mount points, and the `redis` service's address.
    assert env["MODEL_DIR"] == "/artifacts"
    env["MODEL_DIR"] = str(artifacts)
    if "INDEX_CACHE_DIR" in env:
        env["INDEX_CACHE_DIR"] = str(artifacts.parent / "index-cache")
    assert env["REDIS_URL"].startswith("redis://redis:6379/")
    env["REDIS_URL"] = env["REDIS_URL"].replace("redis:6379", f"127.0.0.1:{redis_port}")
    return env


def run_trainer(env: dict[str, str], cwd: Path) -> str:
    """`docker compose run --rm trainer`: its command as compose passes it; the new version."""
    done = subprocess.run(
        service_command("trainer", VARIABLES),
        env=env, cwd=cwd, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return read_latest(Path(env["MODEL_DIR"]))


def start_redis(procs: Processes, tmp_path: Path) -> int:
    """The `redis` service's command on a free port, until its own healthcheck passes."""
    port = free_port()
    service = compose()["services"]["redis"]
    args = [*service["command"], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    proc = procs.start(args, base_env(), tmp_path, "redis")
    cli, *command = service["healthcheck"]["test"][1:]  # ["CMD", "redis-cli", "ping"]
    check = [cli, "-p", str(port), *command]

    def healthy() -> bool | None:
        done = subprocess.run(check, capture_output=True, text=True, timeout=5, check=False)
        return True if done.returncode == 0 and done.stdout.strip() == "PONG" else None

    wait_for(healthy, 10, "redis healthcheck", proc)
    return port


class RecallLoad:
    """Recall requests in a loop on a background thread, recording every status and version."""

    def __init__(self, base: str, user_id: str) -> None:
        self.base, self.user_id = base, user_id
        self.answers: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as client:
            while not self._stop.is_set():
                try:
                    r = client.post("/v1/recall", json={"user_id": self.user_id, "k": 5})
                    version = r.json().get("model_version") if r.status_code == 200 else None
                    self.answers.append((r.status_code, version))
                except httpx.TransportError as exc:
                    self.answers.append((0, type(exc).__name__))
                self._stop.wait(0.05)

    def __enter__(self) -> RecallLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


@pytest.mark.slow
def test_compose_stack_commands_train_publish_serve_and_reload(
    tmp_path: Path, procs: Processes, make_run: MakeRun
) -> None:
    artifacts, workdir = tmp_path / "artifacts", tmp_path / "home"
    artifacts.mkdir()
    workdir.mkdir()  # the image's WORKDIR: no source tree in the current directory
    redis_port = start_redis(procs, tmp_path)

    # trainer: train, export to the volume, publish user features to Redis.
    trainer_env = container_env("trainer", redis_port, artifacts)
    v1 = run_trainer(trainer_env, workdir)
    store = redis.Redis(port=redis_port, decode_responses=True)
    user_key = next(store.scan_iter(match=f"{trainer_env['REDIS_PREFIX']}:user:*"))
    user_id = user_key.split(":user:", 1)[1].removeprefix("{").removesuffix("}")  # hash tag
    store.close()

    # api: the image's default command with the api service's environment (WORKERS=2).
    port = free_port()
    api_env = container_env("api", redis_port, artifacts) | {"PORT": str(port), "HOST": "127.0.0.1"}
    assert api_env["WORKERS"] == "2"
    image = image_runtime()
    api = procs.start(image.cmd, api_env, workdir, "api")
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool | None:  # the image's HEALTHCHECK, as Docker runs it
        done = subprocess.run(image.healthcheck, env=api_env, capture_output=True, timeout=10)
        return True if done.returncode == 0 else None

    wait_for(healthy, 90, "the api healthcheck", api)
    wait_all_workers(base, v1, workers=2, timeout=90)
    ready = httpx.get(f"{base}/health/ready", timeout=5).json()
    assert (ready["redis"], ready["reload_error"]) == ("ok", None)
    recall = httpx.post(f"{base}/v1/recall", json={"user_id": user_id, "k": 10}, timeout=10)
    assert recall.status_code == 200, recall.text
    body = recall.json()
    assert (body["model_version"], body["feature_source"]) == (v1, "redis")
    assert len(body["items"]) == 10

    auth = {"Authorization": f"Bearer {api_env['ADMIN_TOKEN']}"}

    def reload(**body: str) -> dict[str, str]:
        response = httpx.post(f"{base}/admin/reload", json=body, headers=auth, timeout=60)
        assert response.status_code == 200, response.text
        answer: dict[str, str] = response.json()
        return answer

    # Under a steady recall load, no request may fail through all of this.
    with RecallLoad(base, user_id) as load:
        # A second trainer run: every worker process follows LATEST on its own ...
        v2 = run_trainer(trainer_env, workdir)
        assert v2 != v1
        wait_all_workers(base, v2, workers=2, timeout=30)
        # ... so a reload finds nothing to do; one with a version (a rollback) is pinned for
        # every worker although LATEST names v2; one without clears the pin.
        assert reload() == {"model_version": v2, "previous_version": v2}
        assert reload(version=v1) == {"model_version": v1, "previous_version": v2}
        wait_all_workers(base, v1, workers=2, timeout=30)
        assert reload() == {"model_version": v2, "previous_version": v1}
        wait_all_workers(base, v2, workers=2, timeout=30)
        wait_for(lambda: True if load.answers[-1:] == [(200, v2)] else None, 10, "recall on v2")
    assert load.answers and {status for status, _ in load.answers} == {200}
    assert {version for _, version in load.answers} == {v1, v2}
    api.check_running()


@pytest.mark.slow
def test_make_run_script_trains_and_serves_on_embedded_defaults(make_run: MakeRun) -> None:
    ready = wait_ready(make_run.base, 180, make_run.proc)
    assert ready["redis"] == "disabled"
    assert ready["model_version"] == read_latest(make_run.artifacts)
    recall = httpx.post(f"{make_run.base}/v1/recall", json={"user_id": "u1", "k": 5}, timeout=10)
    assert recall.status_code == 200, recall.text
    assert len(recall.json()["items"]) == 5
    os.kill(make_run.proc.popen.pid, signal.SIGTERM)  # run.sh execs the service: uvicorn
    # uvicorn shuts down gracefully, then exits by the signal it caught.
    assert make_run.proc.popen.wait(20) in (0, -signal.SIGTERM)
    assert "Application shutdown complete." in make_run.proc.tail()
    assert get(f"{make_run.base}/health/live") is None

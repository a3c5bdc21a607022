"""Request ids and logs: every response carries `X-Request-ID` (the client's when valid, else a
new one), every request writes one access line (JSON or text), and log lines written during a
request name it."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Bundles
from fastapi import FastAPI
from helpers_app import (
    admin_headers,
    free_port,
    lifespan,
    make_settings,
    serve,
    service_env,
    without_fast_path,
)
from helpers_process import Processes, wait_ready

from app.config import IndexConfig
from app.logs import JsonFormatter, TextFormatter
from app.main import create_app
from app.model import ServingModel
from app.model.history_cap_check import HistoryCapCheck
from app.store import MemoryFeatureStore
from harness.procs import RedisServer

pytestmark = [pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[1]
GENERATED = re.compile(r"[0-9a-f]{32}")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
ACCESS_KEYS = {
    "ts",
    "level",
    "logger",
    "request_id",
    "method",
    "route",
    "status",
    "latency_ms",
    "model_version",
}


class Logged:
    """The service's log lines (loggers `app.*` at info) on stderr, formatted as `python -m app`
    formats them: read through pytest's capfd (access lines go to the file descriptor)."""

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self.capfd = capfd
        self.text = ""

    @contextmanager
    def __call__(self, formatter: logging.Formatter) -> Iterator[None]:
        handler = logging.StreamHandler(sys.stderr)  # capfd's
        handler.setFormatter(formatter)
        logger = logging.getLogger("app")
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        self.capfd.readouterr()
        try:
            yield
        finally:
            self.text = self.capfd.readouterr().err
            logger.removeHandler(handler)
            logger.setLevel(level)

    def json(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]

    def access(self) -> dict[str, dict[str, Any]]:
        """Access lines by request id."""
        lines = [line for line in self.json() if line["logger"] == "app.access"]
        by_id = {line["request_id"]: line for line in lines}
        assert len(by_id) == len(lines), "one access line per request"
        return by_id


@pytest.fixture
def logged(capfd: pytest.CaptureFixture[str]) -> Logged:
    return Logged(capfd)


@pytest.fixture(params=["fast-path", "route"])
def make_app(request: pytest.FixtureRequest, model_dir: Path) -> Callable[..., FastAPI]:
    """The real app, with its fast path for /v1/recall and without it: both must give ids and
    log alike."""

    def make(**settings: Any) -> FastAPI:
        app = create_app(make_settings(model_dir, max_body_bytes=1024, **settings))
        return without_fast_path(app) if request.param == "route" else app

    return make


@pytest.fixture
async def client(make_app: Callable[..., FastAPI]) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(make_app()) as client:
        yield client


REQUESTS: list[tuple[str, str, Any, int]] = [
    ("POST", "/v1/recall", {"user_id": "u1", "k": 3}, 200),
    ("POST", "/v1/recall", {"user_id": "u1", "k": 0}, 422),
    ("POST", "/v1/recall", {"user_id": "u1", "features": {"activity": "abc"}}, 422),
    ("POST", "/v1/recall/batch", {"requests": [{"user_id": "u1"}]}, 200),
    ("PUT", "/v1/users/u1/features", {"features": {"country": "DE"}}, 200),
    ("POST", "/v1/recall", {"user_id": "u1", "history": ["i1"] * 1000}, 413),
    ("GET", "/nope", None, 404),
    ("GET", "/v1/recall", None, 405),
    ("GET", "/admin/models", None, 401),
]


async def call(
    client: httpx.AsyncClient, method: str, path: str, body: Any, headers: Any = None
) -> httpx.Response:
    return await client.request(method, path, json=body, headers=headers)


async def test_a_valid_request_id_is_echoed_on_every_response(client: httpx.AsyncClient) -> None:
    for n, (method, path, body, status) in enumerate(REQUESTS):
        given = f"client-{n}.A_b~c+d|e'f*g#h$i%j&k^l`m!"
        response = await call(client, method, path, body, {"X-Request-ID": given})
        assert response.status_code == status, (path, response.text)
        assert response.headers["x-request-id"] == given


@pytest.mark.parametrize(
    "given",
    [b"", b"a b", b"x" * 129, b"a/b", b"a=b", b"<id>", b'"id"', "caf\xe9".encode("latin-1")],
    ids=["empty", "space", "too-long", "slash", "equals", "angle", "quote", "latin-1"],
)
async def test_an_invalid_request_id_is_replaced(client: httpx.AsyncClient, given: bytes) -> None:
    response = await client.post(
        "/v1/recall", json={"user_id": "u1", "k": 3}, headers={"X-Request-ID": given}
    )
    assert response.status_code == 200
    assert GENERATED.fullmatch(response.headers["x-request-id"])


async def test_a_missing_request_id_is_generated(client: httpx.AsyncClient) -> None:
    ids = set()
    for method, path, body, _ in REQUESTS:
        response = await call(client, method, path, body)
        assert GENERATED.fullmatch(response.headers["x-request-id"])
        ids.add(response.headers["x-request-id"])
    assert len(ids) == len(REQUESTS)
    # The longest valid id is kept.
    longest = "x" * 128
    response = await client.get("/health/live", headers={"X-Request-ID": longest})
    assert response.headers["x-request-id"] == longest


async def test_each_request_writes_one_json_access_line(
    client: httpx.AsyncClient, bundles: Bundles, logged: Logged
) -> None:
    with logged(JsonFormatter()):
        responses = [
            await call(client, method, path, body, {"X-Request-ID": f"req-{n}"})
            for n, (method, path, body, _) in enumerate(REQUESTS)
        ]
    lines = logged.access()
    assert set(lines) == {f"req-{n}" for n in range(len(REQUESTS))}
    routes = {
        "/nope": "unmatched",
        "/v1/users/u1/features": "/v1/users/{user_id}/features",
    }
    for n, (method, path, _, status) in enumerate(REQUESTS):
        line, response = lines[f"req-{n}"], responses[n]
        assert set(line) == ACCESS_KEYS
        assert TIMESTAMP.fullmatch(line["ts"])
        assert line["level"] == "INFO"
        assert line["logger"] == "app.access"
        assert line["method"] == method
        assert line["route"] == routes.get(path, path)
        assert line["status"] == response.status_code == status
        assert isinstance(line["latency_ms"], float) and 0 < line["latency_ms"] < 60_000
        assert line["model_version"] == bundles.v1.name


async def test_the_text_format_still_names_the_request(
    make_app: Callable[..., FastAPI], logged: Logged
) -> None:
    formatter = TextFormatter(fmt="%(levelprefix)s %(message)s", use_colors=False)
    async with serve(make_app(log_format="text")) as client:
        with logged(formatter):
            ok = await client.post(
                "/v1/recall", json={"user_id": "u1"}, headers={"X-Request-ID": "t1"}
            )
            bad = await client.post("/v1/recall", json={"k": 3}, headers={"X-Request-ID": "t2"})
            missing = await client.get("/nope")
    assert (ok.status_code, bad.status_code, missing.status_code) == (200, 422, 404)
    generated = missing.headers["x-request-id"]
    version = ok.json()["model_version"]
    text = r"INFO:     {} {} {} [0-9.]+ ms model_version={} request_id={}"
    expected = [
        text.format("POST", "/v1/recall", 200, version, "t1"),
        text.format("POST", "/v1/recall", 422, version, "t2"),
        text.format("GET", "unmatched", 404, version, generated),
    ]
    lines = logged.text.splitlines()
    assert len(lines) == len(expected)
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern, line), line


async def test_no_access_lines_when_switched_off(model_dir: Path, logged: Logged) -> None:
    async with serve(make_settings(model_dir, access_log=False)) as client:
        with logged(JsonFormatter()):
            response = await client.post("/v1/recall", json={"user_id": "u1"})
            missing = await client.get("/nope")
        assert GENERATED.fullmatch(response.headers["x-request-id"])
        assert GENERATED.fullmatch(missing.headers["x-request-id"])
    assert logged.access() == {}


async def test_application_logs_name_the_request_they_belong_to(
    model_dir: Path, bundles: Bundles, logged: Logged
) -> None:
    async with serve(make_settings(model_dir)) as client:
        with logged(JsonFormatter()):
            reload = await client.post(
                "/admin/reload",
                json={"version": bundles.v2.name},
                headers={**admin_headers(), "X-Request-ID": "reload-1"},
            )
            assert reload.status_code == 200, reload.text
    lines = logged.json()
    swapped = [line for line in lines if line["logger"] == "app.model.repository"]
    assert [line["msg"] for line in swapped] == [f"serving bundle {bundles.v2.name} (flat index)"]
    assert swapped[0]["request_id"] == "reload-1"
    # The reload's access line names the version it left serving.
    assert logged.access()["reload-1"]["model_version"] == bundles.v2.name


@pytest.mark.parametrize("history_cap", [60, 100])
async def test_a_model_reading_more_history_than_the_store_keeps_is_named(
    model_dir: Path, bundles: Bundles, logged: Logged, history_cap: int
) -> None:
    """The test bundles read 100 items: under HISTORY_CAP 60 the store gives them 60 at most,
    which the operator must hear about; the model still serves."""
    async with serve(make_settings(model_dir, history_cap=history_cap)) as client:
        with logged(JsonFormatter()):
            reload = await client.post(
                "/admin/reload", json={"version": bundles.v2.name}, headers=admin_headers()
            )
        assert reload.status_code == 200, reload.text
        assert (await client.post("/v1/recall", json={"user_id": "u1"})).status_code == 200
    warned = [line for line in logged.json() if line["logger"] == "app.model.history_cap_check"]
    if history_cap >= 100:
        assert warned == []
        return
    assert [line["level"] for line in warned] == ["WARNING"]
    assert warned[0]["msg"] == (
        f"bundle {bundles.v2.name} reads the newest 100 history items but HISTORY_CAP keeps 60: "
        "stored histories give it 60 at most; set HISTORY_CAP=100 (and publish-features "
        "--history-length 100), unless the shorter read is meant (`python -m models evaluate "
        "--history-cap 60` measures its cost in quality)"  # a field tower: no shorter read
    )


async def test_the_history_cap_warning_offers_a_shorter_trained_read_to_sequential_bundles(
    bundles: Bundles, caplog: pytest.LogCaptureFixture
) -> None:
    """`train --serve-history-length` is the sequential tower's option (the field tower's
    training refuses it): the warning names it for a sequential bundle only."""
    model = ServingModel.load(bundles.v2, IndexConfig())
    manifest = {**model.manifest, "model": {**model.manifest["model"], "user_tower": "sequence"}}
    check = HistoryCapCheck(MemoryFeatureStore(history_cap=60))
    with caplog.at_level(logging.WARNING, logger="app.model.history_cap_check"):
        await check.prepare(model)
        await check.prepare(dataclasses.replace(model, manifest=manifest))
    field, sequential = (record.getMessage() for record in caplog.records)
    assert "--serve-history-length" not in field
    assert sequential.endswith("`train --serve-history-length 60` makes it the bundle's own)")


async def test_a_server_error_is_logged_and_answered_with_the_request_id(
    model_dir: Path, logged: Logged
) -> None:
    app = create_app(make_settings(model_dir))

    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)  # no route of the service fails: this one does
    # Starlette re-raises after answering (for the server to log): keep the answer instead.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://service") as client,
    ):
        with logged(JsonFormatter()):
            response = await client.get("/broken", headers={"X-Request-ID": "boom-1"})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert response.headers["x-request-id"] == "boom-1"
    lines = logged.json()
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert len(errors) == 1
    assert errors[0]["request_id"] == "boom-1"
    assert errors[0]["msg"] == "unhandled error on GET /broken"
    assert "RuntimeError: a bug" in errors[0]["exc_info"]
    assert logged.access()["boom-1"]["status"] == 500


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["json", "text"])
def test_python_m_app_logs_in_the_chosen_format(
    procs: Processes, model_dir: Path, bundles: Bundles, log_format: str
) -> None:
    port = free_port()
    env = service_env(model_dir, port, LOG_LEVEL="info", LOG_FORMAT=log_format, RELOAD_POLL_S="0")
    env.pop("ACCESS_LOG", None)  # the default: on
    proc = procs.start([sys.executable, "-m", "app"], env, ROOT, f"service-{log_format}")
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, 60, proc)
    recall = httpx.post(
        f"{base}/v1/recall", json={"user_id": "u1", "k": 3}, headers={"X-Request-ID": "proc-1"}
    )
    assert recall.status_code == 200 and recall.headers["x-request-id"] == "proc-1"
    missing = httpx.get(f"{base}/nope")
    proc.stop()  # the log is complete once the process has exited
    output = proc.log.read_text()
    version = bundles.v1.name
    if log_format == "text":
        assert re.search(
            rf"INFO:     POST /v1/recall 200 [0-9.]+ ms model_version={version} request_id=proc-1",
            output,
        )
        assert f"request_id={missing.headers['x-request-id']}" in output
        assert "Application startup complete." in output
        return
    lines = [json.loads(line) for line in output.splitlines()]  # every line, uvicorn's too
    loggers = {line["logger"] for line in lines}
    assert {"uvicorn.error", "app.model.repository", "app.access"} <= loggers
    access = {line["request_id"]: line for line in lines if line["logger"] == "app.access"}
    assert set(access["proc-1"]) == ACCESS_KEYS
    assert access["proc-1"]["route"] == "/v1/recall"
    assert access["proc-1"]["status"] == 200
    assert access["proc-1"]["model_version"] == version
    assert access[missing.headers["x-request-id"]]["status"] == 404


@pytest.mark.slow
def test_a_client_that_left_while_served_is_logged_as_499(
    procs: Processes, model_dir: Path
) -> None:
    """A client that closes its connection while its recall waits (here on a hung Redis)
    gets nothing: its access line says 499, not the 200 the server dropped."""
    redis_server = RedisServer().start()
    try:
        port = free_port()
        env = service_env(
            model_dir, port, LOG_LEVEL="info", LOG_FORMAT="json", RELOAD_POLL_S="0",
            REDIS_URL=redis_server.url, REDIS_TIMEOUT_MS="1500", CACHE_TTL_S="0",
        )  # fmt: skip
        proc = procs.start([sys.executable, "-m", "app"], env, ROOT, "service-499")
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, 60, proc)
        redis_server.pause()
        body = b'{"user_id": "u1", "k": 3}'
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(
                b"POST /v1/recall HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"X-Request-ID: left-early\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            time.sleep(0.3)  # the recall now waits on Redis
        time.sleep(1.5)  # the Redis timeout passes: the recall answers, to nobody
        redis_server.resume()
        stayed = httpx.post(
            f"{base}/v1/recall", json={"user_id": "u1", "k": 3}, headers={"X-Request-ID": "stayed"}
        )
        assert stayed.status_code == 200
        proc.stop()
    finally:
        redis_server.stop()
    lines = [json.loads(line) for line in proc.log.read_text().splitlines()]
    access = {line["request_id"]: line for line in lines if line["logger"] == "app.access"}
    assert access["left-early"]["status"] == 499
    assert access["stayed"]["status"] == 200


@pytest.mark.slow
def test_a_request_the_server_ends_at_shutdown_is_a_503_with_its_id(
    procs: Processes, model_dir: Path
) -> None:
    """A client stalled mid-body when SHUTDOWN_TIMEOUT_S runs out: the server cancels its
    request. It answered a bare 500 without X-Request-ID, logged as a crash and counted as a
    server error on every deploy; it is a 503 to retry elsewhere."""
    port = free_port()
    env = service_env(
        model_dir, port, LOG_LEVEL="info", LOG_FORMAT="json", RELOAD_POLL_S="0",
        SHUTDOWN_TIMEOUT_S="1",
    )  # fmt: skip
    proc = procs.start([sys.executable, "-m", "app"], env, ROOT, "service-shutdown")
    wait_ready(f"http://127.0.0.1:{port}", 60, proc)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
        client.sendall(
            b"POST /v1/recall HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b'X-Request-ID: stalled-1\r\nContent-Length: 100\r\n\r\n{"user_id": '
        )
        time.sleep(1.0)  # the request is read and waits for the rest of its body
        proc.popen.send_signal(signal.SIGTERM)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    proc.popen.wait(30)  # uvicorn ends by raising the signal again: -SIGTERM
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 503 ") and b"x-request-id: stalled-1" in head, answer
    output = proc.log.read_text()
    lines = [json.loads(line) for line in output.splitlines()]
    access = {line["request_id"]: line for line in lines if line["logger"] == "app.access"}
    assert access["stalled-1"]["status"] == 503
    assert "Exception in ASGI application" not in output


def test_other_libraries_warnings_come_out_in_the_services_format() -> None:
    """With LOG_FORMAT=json every line is JSON, a third-party logger's too (redis-py's
    cluster client warns on its own logger: it came out as bare text), Python's warnings
    (numpy's overflow warnings were bare text on stderr), and a message holding a lone
    surrogate (an undecodable path: the formatter failed, and a traceback came out instead);
    LOG_LEVEL above warning quiets the other libraries too. In a process of its own, as the
    service configures logging: once, for the whole process."""
    script = """if True:
        import logging, logging.config, sys, warnings
        from app.logs import logging_config
        logging.config.dictConfig(logging_config("json", sys.argv[1]))
        from app.main import create_app  # which routes Python's warnings to logging
        logging.getLogger("redis.cluster").warning("Topology refresh failed")
        logging.getLogger("redis.cluster").info("not at info")
        logging.getLogger("app.model").info("the service's own")
        warnings.warn("overflow encountered in divide", RuntimeWarning)
        logging.getLogger("app.model").error("cannot read /data/\\udcff")
    """

    def lines(level: str) -> list[tuple[str, str]]:
        done = subprocess.run(
            [sys.executable, "-c", script, level],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "MODEL_DIR": "/nonexistent"},
        )
        found = [json.loads(line) for line in done.stderr.splitlines()]
        return [(line["logger"], line["msg"].splitlines()[0]) for line in found]

    warned = lines("info")
    assert warned[:2] == [
        ("redis.cluster", "Topology refresh failed"),
        ("app.model", "the service's own"),
    ]
    assert warned[2][0] == "py.warnings" and "overflow encountered in divide" in warned[2][1]
    assert warned[3] == ("app.model", "cannot read /data/\udcff")
    assert lines("error") == [("app.model", "cannot read /data/\udcff")]

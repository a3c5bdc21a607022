"""`POST /v1/recall`'s fast path answers exactly as the FastAPI route does; each request it
takes (a JSON body) it answers itself, once, and it hands the route every other one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import Bundles
from helpers_app import make_settings, serve, without_fast_path
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from app.main import create_app
from app.settings import Settings
from models.online_store import publish

pytestmark = [pytest.mark.anyio]

JSON = "application/json"
# (body bytes, content type): good requests, and every kind of bad one.
CASES: list[tuple[bytes, str | None]] = [
    (b'{"user_id": "u1", "k": 5}', JSON),  # stored in Redis
    (b'{"user_id": "u7", "k": 50, "features": {"country": "DE"}}', JSON),  # stored, overridden
    (b'{"user_id": "nobody", "k": 5}', JSON),  # cold start
    (b'{"user_id": "x", "k": 30, "features": {"country": "DE"}, "history": ["i3", "i17"]}', JSON),
    (b'{"user_id": "x", "history": ["i3", "nope"], "exclude_seen": false}', JSON),
    (b'{"user_id": "x", "features": {"country": null}, "history": []}', JSON),
    (b'{"user_id": "u1", "k": 5}', "application/json; charset=utf-8"),
    (b'{"user_id": "u1", "k": 5}', "Application/JSON"),
    (b'{"user_id": "u1", "k": 5, "k": 7}', JSON),  # duplicate keys: the last one
    (b'{"user_id": "u1", "k": 5}', "text/plain"),
    (b'{"user_id": "u1", "k": 5}', None),
    (b'{"user_id": "u1", "k": 0}', JSON),
    (b'{"user_id": "u1", "k": 501}', JSON),  # over MAX_K: the service's own limit
    (b'{"user_id": "u1", "k": 5.0}', JSON),
    (b'{"user_id": "u1", "k": "5"}', JSON),
    (b'{"user_id": "u1", "k": NaN}', JSON),
    (b'{"user_id": "u1", "k": 1e400}', JSON),
    (b'{"user_id": "u1", "extra": 1}', JSON),
    (b'{"user_id": "u1", "features": {"unknown_feature": 1}}', JSON),
    (b'{"user_id": "u1", "features": {"activity": "abc"}}', JSON),  # wrong-typed values
    (b'{"user_id": "u1", "features": {"activity": true, "country": ["DE"]}}', JSON),
    (b'{"user_id": "u1", "features": {"country": 3, "activity": 4}}', JSON),  # an int category
    (b'{"user_id": "\\ud800"}', JSON),  # a lone surrogate
    (b'{"user_id": "a\\nb"}', JSON),
    (b'{"k": 5}', JSON),
    (b"[]", JSON),
    (b"null", JSON),
    (b"", JSON),
    (b'{"user_id": ', JSON),
    (b"\xff\xfe{}", JSON),
    (b"[" * 5000 + b"]" * 5000, JSON),
]


def _answer(response: httpx.Response) -> tuple[int, str, Any]:
    return response.status_code, response.headers.get("content-type", ""), response.json()


@pytest.fixture
def settings(
    model_dir: Path,
    bundles: Bundles,
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.Redis,
) -> Settings:
    """Users published to a real Redis, as the trainer side does. How the scan runs is
    pinned: with `auto`, each app times torch against numpy and the bfloat16 screen against
    none at load and may pick otherwise, whose float32 sums differ in the last bit, and the
    two apps' scores are compared exactly."""
    publish(redis_client, bundles.dataset_v1, prefix=redis_prefix, history_length=100)
    return make_settings(
        model_dir,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        exact_blas="torch",
        exact_screen="off",
    )


async def test_fast_path_answers_as_the_route_does(settings: Settings) -> None:
    async with (
        serve(settings) as fast,
        serve(without_fast_path(create_app(settings))) as route,
    ):
        statuses, sources = set(), set()
        for body, content_type in CASES:
            headers = {"content-type": content_type} if content_type else {}
            got = await fast.post("/v1/recall", content=body, headers=headers)
            want = await route.post("/v1/recall", content=body, headers=headers)
            assert _answer(got) == _answer(want), body[:80]
            statuses.add(got.status_code)
            if got.status_code == 200:
                sources.add(got.json()["feature_source"])
        assert statuses == {200, 422}
        assert sources == {"redis", "request", "default"}
        # Requests it answered are labelled with the route they stand for.
        metrics = (await fast.get("/metrics")).text
        assert 'route="/v1/recall",status="200"' in metrics
        assert 'route="unmatched"' not in metrics


async def test_fast_path_answers_what_it_takes_once_and_hands_on_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached: list[bytes] = []

    class Recorder:  # innermost: sees what the fast path handed on
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                reached.append(scope["path"].encode())
            await self.app(scope, receive, send)

    app = create_app(settings)
    app.user_middleware.append(Middleware(Recorder))
    async with serve(app) as client:
        service = app.state.services.recall
        served: list[str] = []
        recall = service.recall

        async def counted(request: Any) -> bytes:
            served.append(request.user_id)
            return await recall(request)

        monkeypatch.setattr(service, "recall", counted)
        good = await client.post("/v1/recall", json={"user_id": "u1", "k": 3})
        assert good.status_code == 200 and len(good.json()["items"]) == 3
        assert good.json()["feature_source"] == "redis"
        # Refused by validation, and by the service itself: each answered by the fast path,
        # which asked the service at most once (no second pass through the route).
        assert (await client.post("/v1/recall", json={"user_id": "u2", "k": 0})).status_code == 422
        unknown = {"user_id": "u3", "features": {"unknown_feature": 1}}
        assert (await client.post("/v1/recall", json=unknown)).status_code == 422
        assert served == ["u1", "u3"]
        assert reached == []
        plain = await client.post("/v1/recall", content=b'{"user_id": "u1"}')  # no JSON type
        assert plain.status_code == 422  # FastAPI's answer to a body it is not told is JSON
        assert reached == [b"/v1/recall"]
        assert served == ["u1", "u3"]

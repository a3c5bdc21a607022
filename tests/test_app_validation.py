"""Bad input of every kind gets a clear 4xx with an exact body, never a 5xx."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers_app import make_settings, serve

pytestmark = [pytest.mark.anyio]

JSON = {"content-type": "application/json"}
MAX_BODY = 64 * 1024


@pytest.fixture
async def client(model_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        model_dir, max_k=100, max_history=20, max_batch=3, max_body_bytes=MAX_BODY
    )
    async with serve(settings) as client:
        yield client


def error(kind: str, loc: list[Any], msg: str, value: Any, **ctx: Any) -> dict[str, Any]:
    out = {"type": kind, "loc": loc, "msg": msg, "input": value}
    return out | ({"ctx": ctx} if ctx else {})


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (
            {"user_id": "u1", "k": 0},
            [
                error(
                    "greater_than_equal",
                    ["body", "k"],
                    "Input should be greater than or equal to 1",
                    0,
                    ge=1,
                )
            ],
        ),
        (
            {"user_id": "u1", "k": 101},
            [
                error(
                    "less_than_equal",
                    ["body", "k"],
                    "Input should be less than or equal to 100",
                    101,
                )
            ],
        ),
        (
            {"user_id": "u1", "k": 10**30},
            [
                error(
                    "less_than_equal",
                    ["body", "k"],
                    "Input should be less than or equal to 100",
                    10**30,
                )
            ],
        ),
        (
            {"user_id": "u1", "k": "ten"},
            [error("int_type", ["body", "k"], "Input should be a valid integer", "ten")],
        ),
        (
            {"user_id": "u1", "k": True},
            [error("int_type", ["body", "k"], "Input should be a valid integer", True)],
        ),
        (
            {"user_id": "u1", "history": [f"i{n}" for n in range(21)]},
            [error("too_long", ["body", "history"], "List should have at most 20 items", 21)],
        ),
        (
            {"user_id": "u1", "features": {"colour": "red", "country": "DE"}},
            [
                error(
                    "unknown_feature",
                    ["body", "features", "colour"],
                    "Unknown feature 'colour'; this model accepts: activity, age_group, country",
                    "colour",
                )
            ],
        ),
        (
            {"user_id": ""},
            [
                error(
                    "string_too_short",
                    ["body", "user_id"],
                    "String should have at least 1 character",
                    "",
                    min_length=1,
                )
            ],
        ),
        (
            {"user_id": "u1", "exclude": True},
            [error("extra_forbidden", ["body", "exclude"], "Extra inputs are not permitted", True)],
        ),
        (
            {},
            [error("missing", ["body", "user_id"], "Field required", {})],
        ),
    ],
    ids=[
        "k=0",
        "k>MAX_K",
        "huge-k",
        "k-string",
        "k-bool",
        "history-too-long",
        "unknown-feature",
        "empty-user",
        "extra-field",
        "missing-user",
    ],
)
async def test_recall_body_errors(
    client: httpx.AsyncClient, body: dict[str, Any], detail: list[dict[str, Any]]
) -> None:
    response = await client.post("/v1/recall", json=body)
    assert response.status_code == 422
    assert response.json() == {"detail": detail}


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": "a\nb"},
        {"user_id": "x" * 257},
        {"user_id": "u1", "features": {"country": {"nested": 1}}},
        {"user_id": "u1", "features": {"country": ["DE", 1]}},
        {"user_id": "u1", "features": {f"f{n}": 1 for n in range(65)}},
        {"user_id": "u1", "features": {"country": "x" * 257}},
        {"user_id": "u1", "history": "i1"},
        {"user_id": "u1", "history": [""]},
        {"user_id": "u1", "exclude_seen": "yes"},
        {"user_id": 42},
        [{"user_id": "u1"}],
    ],
)
async def test_recall_rejects_wrong_shapes(client: httpx.AsyncClient, body: Any) -> None:
    response = await client.post("/v1/recall", json=body)
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], list)


async def test_non_finite_numbers_are_refused_not_crashed(client: httpx.AsyncClient) -> None:
    # Python's JSON parser accepts NaN/Infinity; echoing them back must not break the 422.
    body = b'{"user_id": "u1", "k": Infinity, "features": {"activity": NaN}}'
    response = await client.post("/v1/recall", content=body, headers=JSON)
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert {
        "type": "int_type",
        "loc": ["body", "k"],
        "msg": "Input should be a valid integer",
        "input": None,
    } in errors
    assert any(e["type"] == "finite_number" for e in errors)


async def test_malformed_json(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/recall", content=b'{"user_id": ', headers=JSON)
    assert response.status_code == 422
    assert response.json() == {
        "detail": [
            {
                "type": "json_invalid",
                "loc": ["body", 12],
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": "Expecting value"},
            }
        ]
    }
    not_json = await client.post("/v1/recall", content=b"user_id=u1")
    assert not_json.status_code == 422


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"\xff\xfe\x00", "not UTF-8"), (b"[" * 20_000 + b"]" * 20_000, "RecursionError")],
    ids=["not-utf8", "too-deep"],
)
async def test_undecodable_bodies_are_422_like_other_json_errors(
    client: httpx.AsyncClient, body: bytes, reason: str
) -> None:
    # FastAPI's own answer would be an undocumented 400 (found by the schemathesis fuzz).
    response = await client.post("/v1/recall", content=body, headers=JSON)
    assert response.status_code == 422
    assert response.json() == {
        "detail": [
            error("json_invalid", ["body"], "JSON decode error", {}, error=reason),
        ]
    }


async def test_batch_limits_and_per_item_locations(client: httpx.AsyncClient) -> None:
    too_many = await client.post("/v1/recall/batch", json={"requests": [{"user_id": "a"}] * 4})
    assert too_many.status_code == 422
    assert too_many.json() == {
        "detail": [error("too_long", ["body", "requests"], "List should have at most 3 items", 4)]
    }
    empty = await client.post("/v1/recall/batch", json={"requests": []})
    assert empty.status_code == 422
    bad = {"requests": [{"user_id": "a"}, {"user_id": "b", "features": {"zzz": 1}}]}
    response = await client.post("/v1/recall/batch", json=bad)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "requests", 1, "features", "zzz"]


async def test_user_writes_are_validated(client: httpx.AsyncClient) -> None:
    unknown = await client.put("/v1/users/u1/features", json={"features": {"colour": "red"}})
    assert unknown.status_code == 422
    assert unknown.json()["detail"][0]["loc"] == ["body", "features", "colour"]
    empty = await client.post("/v1/users/u1/events", json={"item_ids": []})
    assert empty.status_code == 422
    many = await client.post("/v1/users/u1/events", json={"item_ids": ["i1"] * 21})
    assert many.json() == {
        "detail": [error("too_long", ["body", "item_ids"], "List should have at most 20 items", 21)]
    }
    long_id = await client.post("/v1/users/" + "x" * 257 + "/events", json={"item_ids": ["i1"]})
    assert long_id.status_code == 422
    assert long_id.json()["detail"][0]["loc"] == ["path", "user_id"]
    control = await client.put("/v1/users/a%00b/features", json={"features": {}})
    assert control.status_code == 422


async def test_oversized_bodies_are_refused_before_parsing(client: httpx.AsyncClient) -> None:
    detail = {"detail": f"request body exceeds {MAX_BODY} bytes"}
    # Declared by Content-Length.
    big = b'{"user_id": "u1", "history": [' + b'"i1",' * MAX_BODY + b'"i1"]}'
    response = await client.post("/v1/recall", content=big, headers=JSON)
    assert response.status_code == 413
    assert response.json() == detail

    # Streamed without a length (chunked): counted as it arrives.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 8192

    streamed = await client.post("/v1/users/u1/events", content=chunks(), headers=JSON)
    assert "content-length" not in streamed.request.headers
    assert streamed.status_code == 413
    assert streamed.json() == detail
    # Just under the limit is parsed as usual.
    ok = await client.post(
        "/v1/recall", content=b" " * (MAX_BODY - 20) + b'{"user_id":"u"}', headers=JSON
    )
    assert ok.status_code == 200


async def test_unknown_routes_and_methods(client: httpx.AsyncClient) -> None:
    assert (await client.get("/nope")).json() == {"detail": "Not Found"}
    wrong_method = await client.get("/v1/recall")
    assert wrong_method.status_code == 405
    assert wrong_method.json() == {"detail": "Method Not Allowed"}


NASTY_BODIES = [
    b'{"user_id": "\\ud800", "k": 2}',  # lone surrogate: valid JSON, not valid UTF-8
    b'{"user_id": "u", "features": {"country": "\\udc00"}}',
    b'{"user_id": "u", "history": ["\\ud800"]}',
    b'{"user_id": "u", "features": {"activity": 1' + b"0" * 400 + b"}}",  # beyond float range
    b'{"user_id": "u", "k": -1e400}',
    b'{"user_id": "u", "features": {"activity": NaN}}',
    b"\xff\xfe\x00",  # not UTF-8 at all
    b"[" * 50_000 + b"]" * 50_000,  # nesting deeper than the JSON parser's recursion limit
    b"null",
    b'"just a string"',
    b"",
]


@pytest.mark.parametrize("body", NASTY_BODIES, ids=range(len(NASTY_BODIES)))
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/recall"),
        ("POST", "/v1/recall/batch"),
        ("POST", "/v1/users/u1/events"),
        ("PUT", "/v1/users/u1/features"),
    ],
)
async def test_no_input_causes_a_server_error(
    client: httpx.AsyncClient, method: str, path: str, body: bytes
) -> None:
    # The transport re-raises any exception the app lets escape, so a 5xx cannot hide here.
    response = await client.request(method, path, content=body, headers=JSON)
    assert 400 <= response.status_code < 500, response.text
    assert "detail" in response.json()

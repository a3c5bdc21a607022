"""Bad input of every kind gets a clear 4xx with an exact body, never a 5xx."""

from __future__ import annotations

import dataclasses
import http.client
import json
import select
import socket
import sys
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import redis
from conftest import Bundles
from helpers_app import (
    Reference,
    assert_same_recall,
    free_port,
    make_settings,
    serve,
    service_env,
    without_fast_path,
)
from helpers_process import Processes, wait_ready

from app.http.errors import MAX_ERRORS
from app.main import create_app
from app.settings import MAX_HISTORY_CEILING
from models.bundle import write_latest
from models.dataset import ColumnSpec
from models.pipeline import run_training
from models.redis_keys import user_key
from models.train_config import TrainConfig

pytestmark = [pytest.mark.anyio]

JSON = {"content-type": "application/json"}
MAX_BODY = 64 * 1024
ROOT = Path(__file__).resolve().parents[1]


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


COUNTRY = ["body", "features", "country"]


@pytest.mark.parametrize(
    ("body", "loc", "kind"),
    [
        ({"user_id": "a\nb"}, ["body", "user_id"], "string_pattern_mismatch"),
        ({"user_id": "x" * 257}, ["body", "user_id"], "string_too_long"),
        # A feature value is one of several shapes: one error per shape it is not.
        ({"user_id": "u1", "features": {"country": {"nested": 1}}}, COUNTRY, "list_type"),
        ({"user_id": "u1", "features": {"country": ["DE", 1]}}, COUNTRY, "string_type"),
        ({"user_id": "u1", "features": {f"f{n}": 1 for n in range(65)}}, ["body", "features"],
         "too_long"),
        ({"user_id": "u1", "features": {"country": "x" * 257}}, COUNTRY, "string_too_long"),
        ({"user_id": "u1", "history": "i1"}, ["body", "history"], "list_type"),
        ({"user_id": "u1", "history": [""]}, ["body", "history"], "string_too_short"),
        ({"user_id": "u1", "exclude_seen": "yes"}, ["body", "exclude_seen"], "bool_type"),
        ({"user_id": 42}, ["body", "user_id"], "string_type"),
        ([{"user_id": "u1"}], ["body"], "model_attributes_type"),
    ],
)  # fmt: skip
async def test_recall_rejects_wrong_shapes(
    client: httpx.AsyncClient, body: Any, loc: list[str], kind: str
) -> None:
    response = await client.post("/v1/recall", json=body)
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert errors and all(e["loc"][: len(loc)] == loc for e in errors), errors  # that field
    assert kind in {e["type"] for e in errors}, errors  # for that reason


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


async def test_a_recall_without_k_gets_50_or_max_k_when_that_is_lower(model_dir: Path) -> None:
    async with serve(make_settings(model_dir)) as client:
        plain = await client.post("/v1/recall", json={"user_id": "u1"})
        assert plain.status_code == 200 and len(plain.json()["items"]) == 50
    # A service bounded below the default still serves the recalls that name no k (it
    # answered them 422, "less than or equal to 10", for a 50 the client never sent).
    async with serve(make_settings(model_dir, max_k=10)) as client:
        for body in ({"user_id": "u1"}, {"user_id": "u1", "k": None}):
            response = await client.post("/v1/recall", json=body)
            assert response.status_code == 200 and len(response.json()["items"]) == 10
        batch = await client.post("/v1/recall/batch", json={"requests": [{"user_id": "u1"}] * 2})
        assert [len(r["items"]) for r in batch.json()["results"]] == [10, 10]
        too_many = await client.post("/v1/recall", json={"user_id": "u1", "k": 11})
        assert too_many.status_code == 422
        assert too_many.json()["detail"][0]["loc"] == ["body", "k"]


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
    # A trailing slash was a 307 to a Location built from the client's Host header.
    for path in ("/v1/recall/", "/health/live/", "/v1/recall//"):
        slashed = await client.post(path, json={"user_id": "u1"})
        assert (slashed.status_code, slashed.json()) == (404, {"detail": "Not Found"}), path
        assert "location" not in slashed.headers and slashed.headers["x-request-id"]


NASTY_BODIES = [
    b'{"user_id": "\\ud800", "k": 2}',  # lone surrogate: valid JSON, not valid UTF-8
    b'{"user_id": "u", "features": {"country": "\\udc00"}}',
    b'{"user_id": "u", "history": ["\\ud800"]}',
    b'{"user_id": "u", "features": {"activity": 1' + b"0" * 400 + b"}}",  # beyond float range
    b'{"user_id": "u", "k": -1e400}',
    b'{"user_id": "u", "features": {"activity": NaN}}',
    b"\xff\xfe\x00",  # not UTF-8 at all
    b"[" * 50_000 + b"]" * 50_000,  # nesting deeper than the JSON parser's recursion limit
    # Parsed, but nested past what echoing it in the 422 could recurse through (a 500).
    b'{"user_id": "u1", "features": {"country": ' + b"[" * 600 + b"1" + b"]" * 600 + b"}}",
    b'{"user_id": "u1", "history": ' + b'{"a": ' * 600 + b"1" + b"}" * 600 + b"}",
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


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", None])
async def test_a_body_of_another_content_type_is_a_422_whatever_its_bytes(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    """Not JSON by its type, the body is validated as bytes and echoed in the 422: bytes that
    are not UTF-8 failed the echo (a 500)."""
    headers = {"content-type": content_type} if content_type else {}
    for body in (b"\xff", b"\xe9t\xe9", b"{}"):
        response = await client.post("/v1/users/u1/events", content=body, headers=headers)
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body"]
        assert error["input"] == body.decode("utf-8", "replace")


async def test_a_422_names_a_bounded_number_of_errors(client: httpx.AsyncClient) -> None:
    """64 features of a wrong type make 384 errors (six per value, one per type it could
    have), each echoing its input; a 422 names the first MAX_ERRORS."""
    features = {f"f{n}": {"nested": n} for n in range(64)}
    response = await client.post("/v1/recall", json={"user_id": "u1", "features": features})
    assert response.status_code == 422
    assert len(response.json()["detail"]) == MAX_ERRORS


async def test_a_long_list_of_ids_fails_at_its_first_wrong_id_or_past_its_ceiling(
    client: httpx.AsyncClient,
) -> None:
    """130,000 wrong history items made 130,000 errors, each echoing its input: the event loop
    held 6.3 s for a 13.5 MB answer. An id list stops at its first wrong id, and at
    MAX_HISTORY_CEILING ids before validating any."""
    wrong = b",".join([b"1"] * 20_000)
    many = b",".join([b'"i1"'] * (MAX_HISTORY_CEILING + 1))
    for path, start in (
        ("/v1/recall", b'{"user_id": "u1", "history": ['),
        ("/v1/users/u1/events", b'{"item_ids": ['),
    ):
        body = start + wrong + b"]}"
        response = await client.post(path, content=body, headers=JSON)
        assert response.status_code == 422
        (only,) = response.json()["detail"]
        assert only["loc"][-1] == 0 and only["type"] == "string_type"
        body = start + many + b"]}"
        response = await client.post(path, content=body, headers=JSON)
        assert response.status_code == 422
        (only,) = response.json()["detail"]
        assert only["type"] == "too_long" and only["loc"][-1] in ("history", "item_ids")
    # A batch stops at its first wrong request.
    bad = {"user_id": "u1", "history": [1, 2]}
    response = await client.post("/v1/recall/batch", json={"requests": [bad, bad]})
    assert [e["loc"] for e in response.json()["detail"]] == [["body", "requests", 0, "history", 0]]


async def test_the_openapi_document_refuses_what_the_service_refuses(
    client: httpx.AsyncClient,
) -> None:
    """A client that validates against /openapi.json sends what the service takes: names with
    a control character (the schema's patternProperties let them through) and an empty filter
    were valid there and 422 here. The fixture's limits: MAX_K 100, MAX_HISTORY 20."""
    doc = (await client.get("/openapi.json")).json()
    schema = {"$ref": "#/components/schemas/RecallRequest", "components": doc["components"]}
    validator = jsonschema.Draft202012Validator(schema)
    refused = [
        {"features": {"coun\ntry": "DE"}},
        {"features": {"\x7f": 1}},
        {"filter": {}},
        {"filter": {"include": {"cat\x01": ["c1"]}}},
        {"filter": {"range": {"\tprice": {"lt": 3}}}},
        {"history": ["i1"] * 21},
        {"k": 101},
    ]
    for extra in refused:
        body = {"user_id": "u1"} | extra
        assert (await client.post("/v1/recall", json=body)).status_code == 422, extra
        assert not validator.is_valid(body), extra
    taken = [
        {"features": {"country": "DE", "activity": 3.5}},
        {"filter": {"deny_ids": ["i1"]}},
        {"history": ["i1"] * 20, "k": 100},
    ]
    for extra in taken:
        body = {"user_id": "u1"} | extra
        assert (await client.post("/v1/recall", json=body)).status_code == 200, extra
        validator.validate(body)


# -- feature values of the wrong type -------------------------------------------------------
# The synthetic users' features (age_group, country: categorical; activity: numeric, log) plus
# one of every other kind and transform, trained by the real trainer.
TYPED_COLUMNS = (
    ColumnSpec("cohort", "categorical"),  # values "1".."4": requests may send the int
    ColumnSpec("langs", "multi_hot", separator="|"),
    ColumnSpec("tenure", "numeric", transform="standard"),
    ColumnSpec("visits", "numeric", transform="bucket"),
)


@pytest.fixture(scope="module")
def typed_model_dir(tmp_path_factory: pytest.TempPathFactory, bundles: Bundles) -> Path:
    dataset = bundles.dataset_v1
    users = dataset.users
    users = users.assign(
        cohort=[str(1 + i % 4) for i in range(len(users))],
        langs=[f"{c.lower()}|en" if i % 3 else c.lower() for i, c in enumerate(users["country"])],
        tenure=[float(i % 17) for i in range(len(users))],
        visits=users["activity"] * 2,
    )
    typed = dataclasses.replace(
        dataset, users=users, user_columns=dataset.user_columns + TYPED_COLUMNS
    )
    root = tmp_path_factory.mktemp("typed")
    config = TrainConfig(epochs=1, validation_fraction=0.0, batch_size=256)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        bundle = run_training(typed, "none", config, root).bundle
    assert bundle is not None
    write_latest(root, bundle.name)
    return root


@pytest.fixture(params=["fast-path", "route"])
async def typed_client(
    request: pytest.FixtureRequest, typed_model_dir: Path
) -> AsyncIterator[httpx.AsyncClient]:
    """The app over the typed bundle, with its fast path for /v1/recall, and without it."""
    app = create_app(make_settings(typed_model_dir, max_batch=3))
    if request.param == "route":
        without_fast_path(app)
    async with serve(app) as client:
        yield client


CATEGORICAL = "a string or an integer"
MULTI_HOT = "a list of strings or one string joined by '|'"
NUMBER = "a number"
WRONG_TYPES = [
    ("country", "categorical", ["DE"], CATEGORICAL, "a list"),
    ("country", "categorical", 1.5, CATEGORICAL, "a number"),
    ("cohort", "categorical", True, CATEGORICAL, "a boolean"),
    ("langs", "multi_hot", 3, MULTI_HOT, "a number"),
    ("langs", "multi_hot", 0.5, MULTI_HOT, "a number"),
    ("langs", "multi_hot", False, MULTI_HOT, "a boolean"),
    ("activity", "numeric", "abc", NUMBER, "a string"),  # log
    ("activity", "numeric", "12.5", NUMBER, "a string"),
    ("tenure", "numeric", True, NUMBER, "a boolean"),  # standard
    ("visits", "numeric", ["1"], NUMBER, "a list"),  # bucket
]


def type_error(loc: list[Any], name: str, kind: str, value: Any, expected: str, got: str) -> Any:
    msg = f"Feature {name!r} is {kind}: expected {expected}, got {got}"
    return error("feature_type", [*loc, name], msg, value)


@pytest.mark.parametrize(
    ("name", "kind", "value", "expected", "got"),
    WRONG_TYPES,
    ids=[f"{name}-{got.split()[-1]}" for name, _, _, _, got in WRONG_TYPES],
)
async def test_a_wrong_typed_feature_is_named_in_a_422(
    typed_client: httpx.AsyncClient, name: str, kind: str, value: Any, expected: str, got: str
) -> None:
    features = {"country": "DE", name: value}
    want = {"detail": [type_error(["body", "features"], name, kind, value, expected, got)]}

    recall = await typed_client.post("/v1/recall", json={"user_id": "u1", "features": features})
    assert (recall.status_code, recall.json()) == (422, want)

    batch = {"requests": [{"user_id": "u1"}, {"user_id": "u2", "features": features}]}
    response = await typed_client.post("/v1/recall/batch", json=batch)
    loc = ["body", "requests", 1, "features"]
    assert response.status_code == 422
    assert response.json() == {"detail": [type_error(loc, name, kind, value, expected, got)]}

    stored = await typed_client.put("/v1/users/u1/features", json={"features": features})
    assert (stored.status_code, stored.json()) == (422, want)


async def test_every_wrong_typed_feature_is_reported(typed_client: httpx.AsyncClient) -> None:
    features = {"visits": "7", "colour": "red", "activity": "abc", "country": "DE"}
    response = await typed_client.post("/v1/recall", json={"user_id": "u1", "features": features})
    loc = ["body", "features"]
    assert response.status_code == 422
    assert response.json() == {
        "detail": [
            type_error(loc, "activity", "numeric", "abc", NUMBER, "a string"),
            error(
                "unknown_feature",
                [*loc, "colour"],
                "Unknown feature 'colour'; this model accepts: activity, age_group, cohort, "
                "country, langs, tenure, visits",
                "colour",
            ),
            type_error(loc, "visits", "numeric", "7", NUMBER, "a string"),
        ]
    }


async def test_values_of_the_right_type_and_nulls_are_accepted(
    typed_client: httpx.AsyncClient,
) -> None:
    async def items(features: dict[str, Any]) -> list[dict[str, Any]]:
        body = {"user_id": "new", "k": 10, "features": features}
        response = await typed_client.post("/v1/recall", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["feature_source"] == "request"
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    typed = {"country": "DE", "activity": 12, "tenure": 2.5, "visits": 80, "langs": "de|en"}
    # A categorical int is its decimal string; a joined multi_hot string is its list.
    assert await items({**typed, "cohort": 3}) == await items({**typed, "cohort": "3"})
    assert await items({**typed, "langs": ["de", "en"]}) == await items(typed)
    nulls = dict.fromkeys(["country", "age_group", "cohort", "langs", "activity", "tenure"])
    await items(nulls | {"visits": None})
    stored = await typed_client.put("/v1/users/u1/features", json={"features": typed | nulls})
    assert stored.status_code == 200, stored.text


async def test_wrong_typed_stored_values_still_degrade_per_user(
    model_dir: Path,
    bundles: Bundles,
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.Redis,
) -> None:
    # Stored features are not request input: whatever a writer put there, the user is served,
    # a value the encoder cannot use read as missing.
    stored = {"country": ["DE"], "activity": "abc", "age_group": "25-34"}
    redis_client.set(user_key(redis_prefix, "odd"), json.dumps(stored))
    settings = make_settings(model_dir, redis_url=redis_url, redis_prefix=redis_prefix)
    reference = Reference(bundles.v1)
    async with serve(settings) as client:
        response = await client.post("/v1/recall", json={"user_id": "odd", "k": 10})
        assert response.status_code == 200, response.text
        assert response.json()["feature_source"] == "redis"
        assert_same_recall(
            response.json()["items"], reference.top_k({"age_group": "25-34"}, [], 10)
        )


# -- an oversize body over a real socket ------------------------------------------------------
BIG = 15 * 1024 * 1024


@pytest.fixture
def server(procs: Processes, model_dir: Path, tmp_path: Path) -> str:
    """`python -m app` on a real socket (MAX_BODY_BYTES at its default, 1 MiB)."""
    port = free_port()
    env = service_env(model_dir, port, RELOAD_POLL_S="0")
    env.pop("MAX_BODY_BYTES", None)
    proc = procs.start([sys.executable, "-m", "app"], env, ROOT, "service")
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, 60, proc)
    return base


def post_raw(base: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any, str]:
    """POST with http.client, the body sent in full before the answer is read (as urllib and
    most clients do): status, JSON body, Connection header."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        return response.status, json.loads(response.read()), response.getheader("connection", "")
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/v1/recall", "/v1/recall/batch"], ids=["fast-path", "route"])
def test_an_oversize_body_gets_its_413_over_a_real_socket(server: str, path: str) -> None:
    detail = {"detail": "request body exceeds 1048576 bytes"}
    # `Connection: close` (urllib sends it): the server closed with the body unread, and the
    # client, still sending, got "Connection reset by peer" instead of the 413.
    for headers in ({"Connection": "close"}, {}):
        status, body, _ = post_raw(server, path, b" " * BIG, headers)
        assert (status, body) == (413, detail)
    # Chunked, no length: refused once counted past the limit, then drained the same way.
    response = httpx.post(
        server + path, content=iter([b" " * 65536] * (BIG // 65536)), headers=JSON, timeout=30
    )
    assert "content-length" not in response.request.headers
    assert (response.status_code, response.json()) == (413, detail)
    # Same over one keep-alive connection, which then serves the next request.
    with httpx.Client(base_url=server, timeout=30) as client:
        refused = client.post(path, content=b" " * BIG, headers=JSON)
        assert (refused.status_code, refused.json()) == (413, detail)
        assert "connection" not in refused.headers
        body = {"user_id": "u1", "k": 3}
        after = client.post(path, json=body if path == "/v1/recall" else {"requests": [body]})
        assert after.status_code == 200, after.text


@pytest.mark.slow
def test_a_chunked_body_over_the_limit_in_its_last_chunk_gets_its_413_at_once(
    procs: Processes, model_dir: Path
) -> None:
    # The whole chunked body in one write reaches the app as one message that crosses the
    # limit and ends the body: there is nothing left to drain. (It waited out the drain's
    # 10 s for a chunk that would never come, then closed the connection.)
    port = free_port()
    env = service_env(model_dir, port, RELOAD_POLL_S="0", MAX_BODY_BYTES="2048")
    wait_ready(
        f"http://127.0.0.1:{port}",
        60,
        procs.start([sys.executable, "-m", "app"], env, ROOT, "service"),
    )
    body = json.dumps({"user_id": "u1", "k": 3, "history": ["i1"] * 600}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)  # the guard against a hang
    try:
        for path in ("/v1/recall", "/v1/recall/batch"):  # the fast path and the routed one
            conn.putrequest("POST", path)
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))  # one send
            response = conn.getresponse()
            assert response.status == 413 and response.getheader("connection") is None
            assert json.loads(response.read()) == {"detail": "request body exceeds 2048 bytes"}
        conn.request("GET", "/health/live")  # the same connection serves the next request
        assert conn.getresponse().status == 200
    finally:
        conn.close()


@pytest.mark.slow
def test_a_client_waiting_for_100_continue_gets_the_413_at_once(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("POST", "/v1/recall")
        for name, value in [
            ("Content-Type", "application/json"),
            ("Content-Length", str(BIG)),
            ("Expect", "100-continue"),
        ]:
            conn.putheader(name, value)
        conn.endheaders()  # and no body: it is sent only after a `100 Continue`
        response = conn.getresponse()
        assert response.status == 413
        assert json.loads(response.read()) == {"detail": "request body exceeds 1048576 bytes"}
        assert response.getheader("connection") == "close"  # its unsent body ends the connection
    finally:
        conn.close()
    assert httpx.get(f"{server}/health/live").status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/v1/recall", "/v1/recall/batch"], ids=["fast-path", "route"])
def test_a_body_that_does_not_arrive_in_time_gets_a_408_and_frees_the_connection(
    procs: Processes, model_dir: Path, path: str
) -> None:
    # A client that trickles its body (a byte now and then, each within any per-read timeout)
    # or stalls held its connection and its request for as long as it liked.
    port = free_port()
    env = service_env(model_dir, port, RELOAD_POLL_S="0", BODY_TIMEOUT_S="1")
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, 60, procs.start([sys.executable, "-m", "app"], env, ROOT, "service"))
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    for trickle in (True, False):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            started = time.monotonic()  # before: the server's deadline starts on receipt
            sock.sendall(f"{head}Content-Length: 400\r\n\r\n".encode() + b'{"user_id": "u1"')
            # A space every 0.3 s until the answer comes (or 5 s: the test fails below).
            while trickle and time.monotonic() - started < 5:
                if select.select([sock], [], [], 0.3)[0]:
                    break
                sock.sendall(b" ")
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 408
            assert 1.0 <= time.monotonic() - started < 5
            assert json.loads(response.read()) == {"detail": "request body not received within 1 s"}
            assert response.getheader("connection") == "close"
            assert response.getheader("x-request-id")
            assert sock.recv(1) == b""  # closed by the server
    body = {"user_id": "u1", "k": 3}
    answered = httpx.post(base + path, json=body if path == "/v1/recall" else {"requests": [body]})
    assert answered.status_code == 200, answered.text
    counted = f'tower_recall_http_requests_total{{method="POST",route="{path}",status="408"}} 2.0'
    assert counted in httpx.get(base + "/metrics").text

"""Cross-request micro-batching over HTTP: a request served in a batch with others gets exactly
what it gets alone; a bad request fails alone; a reload mid-flight never mixes versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import Bundles
from helpers_app import Reference, admin_headers, assert_same_recall, make_settings, serve

from app.http.schemas import RecallResponse

pytestmark = [pytest.mark.anyio]

STORED = {"age_group": "25-34", "country": "FR", "activity": 3}
REQUESTS: list[dict[str, Any]] = [
    {"user_id": "stored", "k": 10},
    {"user_id": "stored", "k": 25, "exclude_seen": False},
    {"user_id": "stored", "k": 5, "features": {"country": "US"}},
    {"user_id": "stored", "k": 7, "history": []},
    {"user_id": "cold", "k": 10},
    {"user_id": "cold", "k": 3, "history": ["i5", "i6"], "features": {"age_group": "55+"}},
    {"user_id": "other", "k": 50, "history": ["i1", "nope", "i2"], "exclude_seen": True},
    {"user_id": "other", "k": 1},
    # Shallow searches of varied users: on a coarse HNSW graph, depth changes their answer.
    *({"user_id": f"shallow{i}", "k": 1, "history": [f"i{i}"]} for i in range(0, 200, 25)),
]


async def gather(client: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """POST every body to /v1/recall concurrently; responses in body order."""
    responses: list[httpx.Response | None] = [None] * len(bodies)

    async def post(i: int, body: dict[str, Any]) -> None:
        responses[i] = await client.post("/v1/recall", json=body)

    async with anyio.create_task_group() as tg:
        for i, body in enumerate(bodies):
            tg.start_soon(post, i, body)
    return [r for r in responses if r is not None]


async def batch_sizes(client: httpx.AsyncClient) -> tuple[float, float]:
    """(batches served, recalls in them) from /metrics."""
    text = (await client.get("/metrics")).text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
    return float(values["tower_recall_batch_size_count"]), float(
        values["tower_recall_batch_size_sum"]
    )


def same_response(got: dict[str, Any], alone: dict[str, Any]) -> None:
    assert {k: v for k, v in got.items() if k != "items"} == {
        k: v for k, v in alone.items() if k != "items"
    }
    assert_same_recall(got["items"], [(i["item_id"], i["score"]) for i in alone["items"]])


@pytest.mark.parametrize(
    ("store", "recall_thread", "index", "screen"),
    [
        # Alone, a request is scanned in float32; in a batch, screened in bfloat16 ("on") or
        # scanned in float32 ("off"): the answers must not differ.
        ("memory", True, "flat", "on"),
        ("redis", True, "flat", "off"),
        ("redis", False, "flat", "on"),
        # A coarse graph: its answers depend on the search depth, which must be the
        # request's own, whatever else is in the batch.
        ("memory", True, "hnsw", "auto"),
    ],
)
async def test_batched_responses_equal_responses_alone(
    model_dir: Path,
    redis_url: str,
    redis_prefix: str,
    store: str,
    recall_thread: bool,
    index: str,
    screen: str,
) -> None:
    extra: dict[str, Any] = {
        "recall_thread": recall_thread,
        "index_type": index,
        "exact_screen": screen,
    }
    if index == "hnsw":
        extra |= {"hnsw_m": 4, "hnsw_ef_search": 4, "hnsw_ef_construction": 8}
    if store == "redis":
        extra |= {"redis_url": redis_url, "redis_prefix": redis_prefix}
    async with serve(make_settings(model_dir, **extra)) as client:
        await client.put("/v1/users/stored/features", json={"features": STORED})
        await client.post("/v1/users/stored/events", json={"item_ids": ["i9", "i8", "i7"]})
        await client.post("/v1/users/other/events", json={"item_ids": ["i3"]})
        alone = []
        for body in REQUESTS:
            response = await client.post("/v1/recall", json=body)
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"
            # Serialised by orjson, exactly the declared model: nothing more, nothing less.
            model = RecallResponse.model_validate_json(response.content, strict=True)
            assert model.model_dump() == response.json()
            alone.append(response.json())
        before = await batch_sizes(client)
        for _ in range(3):
            responses = await gather(client, REQUESTS * 3)
            for response, expected in zip(responses, alone * 3, strict=True):
                assert response.status_code == 200
                same_response(response.json(), expected)
        batches, recalls = (a - b for a, b in zip(await batch_sizes(client), before, strict=True))
        metrics = (await client.get("/metrics")).text
    for stage in ("feature_fetch", "encode", "search", "serialise"):
        assert f'tower_recall_stage_duration_seconds_count{{stage="{stage}"}}' in metrics
    assert recalls == 3 * 3 * len(REQUESTS)
    assert batches < recalls  # they were served together, not one by one


async def test_invalid_requests_fail_alone_in_a_batch(model_dir: Path) -> None:
    settings = make_settings(model_dir, max_k=100, max_history=5)
    bad: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (
            {"user_id": "b1", "k": 101},
            {
                "type": "less_than_equal",
                "loc": ["body", "k"],
                "msg": "Input should be less than or equal to 100",
                "input": 101,
            },
        ),
        (
            {"user_id": "b2", "features": {"shoe_size": 44}},
            {"type": "unknown_feature", "loc": ["body", "features", "shoe_size"]},
        ),
        (
            {"user_id": "b3", "history": ["i1"] * 6},
            {"type": "too_long", "loc": ["body", "history"], "input": 6},
        ),
    ]
    async with serve(settings) as client:
        alone = [(await client.post("/v1/recall", json=body)).json() for body in REQUESTS]
        bodies = [body for body, _ in bad] + REQUESTS
        responses = await gather(client, bodies)
    for response, (_, error) in zip(responses, bad, strict=False):
        assert response.status_code == 422
        (detail,) = response.json()["detail"]
        assert {k: detail[k] for k in error} == error
    for response, expected in zip(responses[len(bad) :], alone, strict=True):
        assert response.status_code == 200
        same_response(response.json(), expected)


async def test_a_reload_mid_flight_never_mixes_versions(model_dir: Path, bundles: Bundles) -> None:
    references = {b.name: Reference(b) for b in (bundles.v1, bundles.v2)}
    bodies = [{"user_id": f"r{i}", "k": 10, "history": [f"i{i}"]} for i in range(12)]
    seen: list[dict[str, Any]] = []
    async with serve(make_settings(model_dir)) as client:
        reloaded = anyio.Event()

        async def load() -> None:
            # Rounds of concurrent requests until the reload is done, and one more: the swap
            # lands among them, however long the load takes.
            done_before = False
            while not done_before:
                done_before = reloaded.is_set()
                for response in await gather(client, bodies):
                    assert response.status_code == 200
                    seen.append(response.json())
                await anyio.sleep(0)

        async def reload() -> None:
            await anyio.sleep(0)
            body = {"version": bundles.v2.name}
            response = await client.post("/admin/reload", json=body, headers=admin_headers())
            assert response.status_code == 200
            reloaded.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(load)
            tg.start_soon(reload)
        after = (await gather(client, bodies))[0].json()
    assert after["model_version"] == bundles.v2.name
    assert {r["model_version"] for r in seen} == {bundles.v1.name, bundles.v2.name}
    # Each response names one version, and its items are exactly that version's answer.
    for response in seen:
        reference = references[response["model_version"]]
        history = [f"i{response['user_id'][1:]}"]
        assert_same_recall(response["items"], reference.top_k({}, history, 10))


def vector_cache(text: str) -> dict[str, float]:
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
    return {
        result: float(values.get(f'tower_recall_vector_cache_total{{result="{result}"}}', 0))
        for result in ("hit", "miss")
    }


async def test_user_vectors_are_reused_until_inputs_or_version_change(
    model_dir: Path, bundles: Bundles, redis_url: str, redis_prefix: str
) -> None:
    references = {b.name: Reference(b) for b in (bundles.v1, bundles.v2)}
    settings = make_settings(model_dir, redis_url=redis_url, redis_prefix=redis_prefix)
    stored = dict(STORED)
    seen = {"hit": 0.0, "miss": 0.0}
    async with serve(settings) as client:

        async def recall(body: dict[str, Any], version: str, history: list[str]) -> str:
            """Checks the answer against the reference; "hit" if the vector was reused."""
            response = (await client.post("/v1/recall", json=body)).json()
            assert response["model_version"] == version
            features = {**stored, **body.get("features", {})}
            expected = references[version].top_k(features, history, 10)
            assert_same_recall(response["items"], expected)
            counts = vector_cache((await client.get("/metrics")).text)
            outcome = "hit" if counts["hit"] > seen["hit"] else "miss"
            seen.update(counts)
            return outcome

        await client.put("/v1/users/vc/features", json={"features": stored})
        await client.post("/v1/users/vc/events", json={"item_ids": ["i1"]})
        plain = {"user_id": "vc", "k": 10}
        v1, v2 = bundles.v1.name, bundles.v2.name
        outcomes = [
            await recall(plain, v1, ["i1"]),
            await recall(plain, v1, ["i1"]),
            await recall({**plain, "features": {"country": "US"}}, v1, ["i1"]),
            await recall(plain, v1, ["i1"]),  # the override replaced the user's entry
        ]
        await client.post("/v1/users/vc/events", json={"item_ids": ["i2"]})
        outcomes.append(await recall(plain, v1, ["i2", "i1"]))
        stored["activity"] = 9
        await client.put("/v1/users/vc/features", json={"features": stored})
        outcomes.append(await recall(plain, v1, ["i2", "i1"]))
        await client.post("/admin/reload", json={"version": v2}, headers=admin_headers())
        outcomes.append(await recall(plain, v2, ["i2", "i1"]))
        outcomes.append(await recall(plain, v2, ["i2", "i1"]))
    assert outcomes == ["miss", "hit", "miss", "miss", "miss", "miss", "miss", "hit"]

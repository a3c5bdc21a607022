"""Recall filters: the bundle's item attributes, compiled masks, and filtered recall over HTTP
(exactly the top k passing items, with seen items, in batches, on HNSW; 422 with reasons)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import Bundles
from helpers_app import Reference, admin_headers, copy_version, make_settings, serve

from app import filters as filters_module
from app.config import IndexConfig
from app.filters import MAX_BATCH_FILTERS, FilterCache, compile_filter
from app.http.schemas import RecallFilter
from app.main import create_app
from app.model import ServingModel
from models.bundle import ITEM_ATTRIBUTES, verify_bundle, write_latest
from models.item_attributes import ItemAttributes

pytestmark = [pytest.mark.anyio]

Passes = Callable[[pd.DataFrame], Any]  # a boolean Series or array over the rows


@pytest.fixture(scope="module")
def reference(bundles: Bundles) -> Reference:
    return Reference(bundles.v1)


@pytest.fixture(scope="module")
def items(bundles: Bundles) -> pd.DataFrame:
    """The v1 catalogue's raw attributes in bundle row order."""
    ids = verify_bundle(bundles.v1).item_ids
    return bundles.dataset_v1.items.reindex(ids)


def _tags(items: pd.DataFrame) -> pd.Series:
    return items["tags"].fillna("").str.split("|").apply(set)


def _expected(
    reference: Reference, items: pd.DataFrame, passes: Passes, history: list[str], k: int
) -> list[str]:
    """The exact filtered top k, computed apart from the service."""
    ok = set(items.index[np.asarray(passes(items))])
    ranked = reference.top_k({}, history, len(reference.item_ids))
    return [item for item, _ in ranked if item in ok][:k]


def test_attributes_round_trip_and_match_the_item_table(
    bundles: Bundles, items: pd.DataFrame, tmp_path: Path
) -> None:
    stored = ItemAttributes.load(bundles.v1 / ITEM_ATTRIBUTES)
    assert stored.n_items == len(items) and set(stored.columns) == {"category", "tags", "price"}
    category = stored.columns["category"]
    assert list(category.dictionary[category.codes]) == items["category"].tolist()
    tags = stored.columns["tags"]
    bounds = zip(tags.offsets[:-1], tags.offsets[1:], strict=True)
    rows = [set(tags.dictionary[tags.codes[a:b]]) for a, b in bounds]
    assert rows == _tags(items).tolist()
    np.testing.assert_array_equal(stored.columns["price"].numbers, items["price"].to_numpy())

    # Missing values survive a round trip: -1 codes, empty rows, NaN.
    holes = items.copy()
    holes.iloc[0] = [None, None, None]
    made = ItemAttributes.from_frame(holes, bundles.dataset_v1.item_columns, list(holes.index))
    made.save(tmp_path / "a.npz")
    again = ItemAttributes.load(tmp_path / "a.npz")
    assert again.columns["category"].codes[0] == -1
    assert again.columns["tags"].offsets[1] == 0
    assert np.isnan(again.columns["price"].numbers[0])
    for name, column in made.columns.items():
        for part in ("dictionary", "codes", "offsets", "numbers"):
            np.testing.assert_array_equal(getattr(again.columns[name], part), getattr(column, part))


def test_mask_and_accepts_agree_with_pandas(bundles: Bundles, items: pd.DataFrame) -> None:
    model = ServingModel.load(bundles.v1, IndexConfig())
    price = float(items["price"].median())
    spec = RecallFilter.model_validate(
        {
            "include": {"category": ["c0", "c1", "c2"]},
            "exclude": {"tags": ["t0", "t1"]},
            "range": {"price": {"gt": price / 4, "lte": price * 2}},
            "deny_ids": [items.index[0], "not-in-the-catalogue"],
        }
    )
    compiled = compile_filter(model, spec, ("body",))
    tags = _tags(items)
    expected = (
        items["category"].isin(["c0", "c1", "c2"])
        & tags.apply(lambda t: not t & {"t0", "t1"})
        & (items["price"] > price / 4)
        & (items["price"] <= price * 2)
    ).to_numpy(copy=True)
    expected[0] = False
    np.testing.assert_array_equal(compiled.allowed.mask, expected)
    assert 0 < compiled.allowed.count < len(items)
    judged = [compiled.accepts(i, row.to_dict()) for i, row in items.iterrows()]
    assert judged == expected.tolist()
    assert not compiled.accepts("new", {"category": "c1", "tags": "t0|t5", "price": price})
    assert compiled.accepts("new", {"category": "c1", "tags": ["t5"], "price": price})
    assert not compiled.accepts("new", {"category": "c1"})  # no price: outside the range

    # The same filter, spelled differently, compiles once per version.
    cache = FilterCache()
    again = RecallFilter.model_validate(
        {**spec.model_dump(exclude_none=True), "include": {"category": ["c2", "c1", "c0", "c1"]}}
    )
    assert cache.get(model, spec, ("body",)) is cache.get(model, again, ("body",))


EVEN = [f"i{n}" for n in range(0, 200, 2)]
SOME = ["i5", "i9", "i77", "i150"]
# Each filter, and the same judged by pandas over the item table.
FILTERS: list[tuple[dict[str, Any], Passes]] = [
    ({"include": {"category": ["c1", "c3"]}}, lambda f: f["category"].isin(["c1", "c3"])),
    ({"include": {"tags": ["t2", "t7"]}}, lambda f: ~_tags(f).apply({"t2", "t7"}.isdisjoint)),
    ({"exclude": {"category": ["c0", "c2"]}}, lambda f: ~f["category"].isin(["c0", "c2"])),
    ({"range": {"price": {"gte": 10, "lt": 40}}}, lambda f: f["price"].between(10, 40, "left")),
    ({"allow_ids": [*SOME, "x"]}, lambda f: f.index.isin(SOME)),
    ({"deny_ids": EVEN}, lambda f: ~f.index.isin(EVEN)),
]  # fmt: skip


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
@pytest.mark.parametrize("long_history", [False, True])
async def test_filtered_recall_is_the_exact_filtered_top_k(
    model_dir: Path, reference: Reference, items: pd.DataFrame, index_type: str, long_history: bool
) -> None:
    """A short history, or 150 items of which the tower reads the newest 100: the 50 older
    ones are excluded by id (`Query.older_seen`), under every filter as well."""
    history = list(reference.item_ids[:150]) if long_history else ["i3", "i17", "i150", "i5"]
    async with serve(make_settings(model_dir, index_type=index_type)) as client:
        for spec, passes in FILTERS:
            for k in (5, 60):
                body = {"user_id": "u1", "k": k, "history": history, "filter": spec}
                response = await client.post("/v1/recall", json=body)
                assert response.status_code == 200, response.text
                got = [i["item_id"] for i in response.json()["items"]]
                want = _expected(reference, items, passes, history, k)
                assert got == want, spec
                assert not set(got) & set(history)
                # Exactly k whenever k pass; fewer only when fewer do.
                passing = set(items.index[np.asarray(passes(items))])
                assert len(got) == min(k, len(passing - set(history)))


async def test_hnsw_selective_filter_still_returns_exactly_k(
    model_dir: Path, reference: Reference, items: pd.DataFrame
) -> None:
    # A coarse graph with efSearch 1: the selector path alone would miss passing items; the
    # exact fallback fills the answer.
    settings = make_settings(
        model_dir, index_type="hnsw", hnsw_m=4, hnsw_ef_search=1, hnsw_ef_construction=4
    )
    spec, passes = FILTERS[0]
    async with serve(settings) as client:
        for k in (10, 15):
            body = {"user_id": "u1", "k": k, "filter": spec}
            got = [
                i["item_id"] for i in (await client.post("/v1/recall", json=body)).json()["items"]
            ]
            assert len(got) == k
            assert set(got) <= set(items.index[np.asarray(passes(items))])


@pytest.fixture
def any_filter_indexed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test catalogue is small: every filter is let through to the graph's path, where a
    filter searched often gets an index of its own rows (`app.search.filter_index`)."""
    monkeypatch.setattr("app.search.faiss_index.ANN_MIN_SHARE", 0.0)
    monkeypatch.setattr("app.search.faiss_index.OWN_INDEX_MAX_SHARE", 1.0)
    monkeypatch.setattr("app.search.allowed.MAX_GATHERED_ROWS", 0)


@pytest.mark.usefixtures("any_filter_indexed")
async def test_hnsw_filters_served_by_their_own_indexes_are_the_exact_top_k(
    model_dir: Path, reference: Reference, items: pd.DataFrame
) -> None:
    settings = make_settings(
        model_dir, index_type="hnsw", filter_index_after=1, filter_index_rows=0.25
    )
    app = create_app(settings)
    history = ["i3", "i17", "i150", "i5"]
    async with serve(app) as client:
        services = app.state.services
        model = services.repository.require()
        own = model.index.filter_indexes
        assert own.max_rows == model.n_items // 4  # FILTER_INDEX_ROWS
        own.max_rows = 10 * model.n_items  # every filter's index at once
        own.pause = 0.0  # and each built right after the one before
        for spec, passes in FILTERS:
            body = {"user_id": "u1", "k": 20, "history": history, "filter": spec}
            assert (await client.post("/v1/recall", json=body)).status_code == 200
            own.wait(60)
            compiled = services.recall.filters.get(model, RecallFilter(**spec), ("body",))
            assert own.ready(compiled.allowed), spec
            response = await client.post("/v1/recall", json=body)
            got = [i["item_id"] for i in response.json()["items"]]
            assert got == _expected(reference, items, passes, history, 20), spec
        metrics = (await client.get("/metrics")).text
        assert f"tower_recall_filter_indexes {float(len(FILTERS))}" in metrics


@pytest.mark.usefixtures("any_filter_indexed")
async def test_a_reload_builds_the_serving_models_filter_indexes_before_the_swap(
    model_dir: Path, bundles: Bundles
) -> None:
    settings = make_settings(
        model_dir, index_type="hnsw", filter_index_after=2, filter_index_rows=1.0
    )
    app = create_app(settings)
    gone, cold, hot = FILTERS[1][0], FILTERS[4][0], FILTERS[0][0]
    async with serve(app) as client:
        services = app.state.services
        services.recall.filters.size = 2  # the worker's filter cache keeps the last two only
        old = services.repository.require()
        old.index.filter_indexes.pause = 0.0
        # `gone` gets an index, then leaves the cache; `cold` is searched once (no index).
        for spec, times in ((gone, 2), (cold, 1), (hot, 2)):
            body = {"user_id": "u1", "k": 20, "filter": spec}
            for _ in range(times):
                assert (await client.post("/v1/recall", json=body)).status_code == 200
            old.index.filter_indexes.wait(60)
        assert len(old.index.filter_indexes) == 2
        body = {"version": bundles.v2.name}
        response = await client.post("/admin/reload", json=body, headers=admin_headers())
        assert response.status_code == 200, response.text
        new = services.repository.require()
        assert new.version == bundles.v2.name
        # Before any search on the new model: the hot filter's index is there; neither the
        # filter the cache let go nor the cold one got one.
        assert len(new.index.filter_indexes) == 1
        compiled = services.recall.filters.get(new, RecallFilter(**hot), ("body",))
        assert new.index.has_filter_index(compiled.allowed)
        assert "tower_recall_filter_indexes 1.0" in (await client.get("/metrics")).text
        response = await client.post("/v1/recall", json={"user_id": "u1", "k": 20, "filter": hot})
        assert response.status_code == 200
        assert response.json()["model_version"] == bundles.v2.name


async def test_batch_with_mixed_filters_answers_each_alone(
    model_dir: Path, reference: Reference, items: pd.DataFrame
) -> None:
    requests = [
        {"user_id": f"u{n}", "k": 20, "history": [f"i{n}"], **({"filter": spec} if spec else {})}
        for n, (spec, _) in enumerate([*FILTERS, ({}, None), FILTERS[0]])
    ]
    async with serve(make_settings(model_dir)) as client:
        response = await client.post("/v1/recall/batch", json={"requests": requests})
        assert response.status_code == 200
        batched = [r["items"] for r in response.json()["results"]]
        for request, items_got in zip(requests, batched, strict=True):
            alone = (await client.post("/v1/recall", json=request)).json()["items"]
            # The same items; scores equal up to the batched product's rounding.
            assert [i["item_id"] for i in items_got] == [i["item_id"] for i in alone]
            got, want = ([i["score"] for i in x] for x in (items_got, alone))
            np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "loc", "reason"),
    [
        ({"include": {"colour": ["red"]}}, ["include", "colour"], "unknown item attribute"),
        ({"include": {"category": ["c1", "zzz"]}}, ["include", "category"], "unknown value"),
        ({"exclude": {"tags": ["t999"]}}, ["exclude", "tags"], "unknown value"),
        ({"include": {"price": ["3"]}}, ["include", "price"], "is numeric"),
        ({"range": {"category": {"gte": 1}}}, ["range", "category"], "range needs a numeric"),
    ],
)
async def test_catalogue_errors_are_422_with_the_reason(
    model_dir: Path, spec: dict[str, Any], loc: list[str], reason: str
) -> None:
    async with serve(make_settings(model_dir)) as client:
        batch = {"requests": [{"user_id": "u1"}, {"user_id": "u2", "filter": spec}]}
        for path, body in [
            ("/v1/recall", {"user_id": "u1", "filter": spec}),
            ("/v1/recall/batch", batch),
        ]:
            response = await client.post(path, json=body)
            assert response.status_code == 422
            (error,) = response.json()["detail"]
            prefix = ["body"] if path == "/v1/recall" else ["body", "requests", 1]
            assert error["loc"] == [*prefix, "filter", *loc]
            assert reason in error["msg"]


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({}, "at least one clause"),
        ({"include": {}}, "at least 1"),
        ({"include": {"category": []}}, "at least 1"),
        ({"range": {"price": {}}}, "at least one of gte"),
        ({"range": {"price": {"gte": 5, "lt": 5}}}, "the range is empty"),
        ({"range": {"price": {"gt": 9, "lte": 2}}}, "the range is empty"),
        ({"range": {"price": {"gte": "NaN"}}}, "valid number"),
        ({"range": {"price": {"gte": True}}}, "valid number"),
        ({"include": {"tags": ["t1"]}, "exclude": {"tags": ["t1"]}}, "both includes and excludes"),
        ({"allow_ids": ["i1"], "deny_ids": ["i1"]}, "both allowed and denied"),
        ({"deny_ids": [f"i{n}" for n in range(1001)]}, "at most 1000"),
        ({"include": {"tags": ["t1"] * 257}}, "at most 256"),
        ({"where": {"a": 1}}, "Extra inputs"),
    ],
)
async def test_malformed_filters_are_422(
    model_dir: Path, spec: dict[str, Any], reason: str
) -> None:
    async with serve(make_settings(model_dir)) as client:
        response = await client.post("/v1/recall", json={"user_id": "u1", "filter": spec})
        assert response.status_code == 422
        assert reason in str(response.json()["detail"])


async def test_filter_in_the_openapi_schema(model_dir: Path) -> None:
    async with serve(make_settings(model_dir)) as client:
        schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
        assert set(schemas["RecallFilter"]["properties"]) == {
            "include", "exclude", "range", "allow_ids", "deny_ids"
        }  # fmt: skip
        assert set(schemas["AttributeRange"]["properties"]) == {"gte", "gt", "lte", "lt"}


async def test_a_bundle_without_attributes_filters_by_ids_only(
    tmp_path: Path, bundles: Bundles
) -> None:
    def drop_attributes(bundle: Path) -> None:
        (bundle / ITEM_ATTRIBUTES).unlink()
        manifest = json.loads((bundle / "manifest.json").read_text())
        del manifest["sha256"][ITEM_ATTRIBUTES]
        (bundle / "manifest.json").write_text(json.dumps(manifest))

    root = tmp_path / "artifacts"
    root.mkdir()
    version = "20260101T000000Z-abcdef"
    copy_version(root, bundles.v1, version, drop_attributes)
    write_latest(root, version)
    async with serve(make_settings(root)) as client:
        body = {"user_id": "u1", "k": 10, "filter": {"include": {"category": ["c1"]}}}
        response = await client.post("/v1/recall", json=body)
        assert response.status_code == 422
        assert "no item attributes" in response.json()["detail"][0]["msg"]
        body = {"user_id": "u1", "k": 10, "filter": {"allow_ids": SOME}}
        items = (await client.post("/v1/recall", json=body)).json()["items"]
        assert sorted(i["item_id"] for i in items) == sorted(SOME)


async def test_each_requests_filter_is_compiled_once_and_a_batch_names_few(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter compiles in passes over the catalogue. Each was compiled when its request was
    checked and again when served, and past the filter cache's 16 the second compile missed
    the cache too, all on the event loop: 256 distinct filters in one batch held it for
    seconds."""
    compiles: list[str] = []
    threads: set[str] = set()
    compile_for = filters_module._compile

    def counted(model: ServingModel, key: str, loc: Any) -> Any:
        compiles.append(key)
        threads.add(threading.current_thread().name)
        return compile_for(model, key, loc)

    monkeypatch.setattr(filters_module, "_compile", counted)

    def body(i: int) -> dict[str, Any]:
        spec = {"range": {"price": {"gte": -1.0 - i / 1000}}}
        return {"user_id": f"u{i}", "k": 5, "filter": spec}

    async with serve(make_settings(model_dir, max_batch=64)) as client:
        answers = await asyncio.gather(
            *(client.post("/v1/recall", json=body(i)) for i in range(40))
        )
        assert all(a.status_code == 200 for a in answers)
        assert len(compiles) == 40  # one each, however the micro-batches fell
        # Passes over the catalogue: off the event loop, which other requests wait for.
        assert threading.main_thread().name not in threads
        compiles.clear()
        # MAX_BATCH_FILTERS distinct filters, each named twice: compiled once each.
        many = [body(1000 + i) for i in range(MAX_BATCH_FILTERS)] * 2
        response = await client.post("/v1/recall/batch", json={"requests": many[:16] + many[:8]})
        assert response.status_code == 200 and len(compiles) == MAX_BATCH_FILTERS
        too_many = {"requests": [body(2000 + i) for i in range(MAX_BATCH_FILTERS + 1)]}
        refused = await client.post("/v1/recall/batch", json=too_many)
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["msg"] == "at most 16 distinct filters in one batch"

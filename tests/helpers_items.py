"""Helpers of the item-change tests (tests/test_app_items.py): bundles trained by the real
trainer for them, and items "like" a category's and unlike them, read off the item table."""

from __future__ import annotations

import json
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pandas as pd
import pytest
import torch
from helpers_app import admin_headers

from models import bundle as b
from models.dataset import Dataset
from models.export import export_bundle
from models.pipeline import run_training
from models.recommender import TwoTowerRecommender
from models.sources import load_dataset
from models.train_config import TrainConfig

# Ten epochs and no popularity prior: a new item gets the prior of an item without
# interactions, which in a 200-item catalogue ranks it below every item with any; these
# bundles ask whether its attributes alone carry it to the users of its kind.
SOURCE = "synthetic:seed=1,users=300,items=200"
SOURCE_MORE_ITEMS = "synthetic:seed=1,users=300,items=220"  # ids i0..i219: i200+ are new to v1
CONFIG = TrainConfig(epochs=10, validation_fraction=0.0, batch_size=256, popularity_prior=0.0)


@dataclass(frozen=True)
class ItemBundles:
    """`v1` on SOURCE, `v2` on SOURCE_MORE_ITEMS (it holds i200..i219, v1 does not), and
    `format_1`: v1's model exported as bundle format 1 (no item tower)."""

    v1: Path
    v2: Path
    format_1: Path
    dataset: Dataset


def trained_item_bundles(factory: pytest.TempPathFactory) -> ItemBundles:
    """Trained once per session, whichever test module asks first (kept in the session's
    base temp dir)."""
    root = factory.getbasetemp() / "item-bundles"
    done = root / "trained.json"
    if done.exists():
        v1, v2, old = (root / name for name in json.loads(done.read_text()))
        return ItemBundles(v1, v2, old, load_dataset(SOURCE))
    root.mkdir(exist_ok=True)
    bundles = _train(root)
    names = [
        bundles.v1.name,
        bundles.v2.name,
        f"{bundles.format_1.parent.name}/{bundles.format_1.name}",
    ]
    done.write_text(json.dumps(names))
    return bundles


def _train(root: Path) -> ItemBundles:
    torch.set_num_threads(1)
    dataset = load_dataset(SOURCE)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        run = run_training(dataset, "none", CONFIG, root)
        v2 = run_training(load_dataset(SOURCE_MORE_ITEMS), "none", CONFIG, root).bundle
        # As earlier trainers wrote it (the exporter's own option for format 1).
        rec = TwoTowerRecommender(run.trained, dataset.users)
        rec.fit(dataset.interactions, run.trained.user_encoder.item_index)
        inputs = rec.user_inputs([*rec.known_users[:32], "nobody"])
        old = root / "format-1"
        shutil.rmtree(old, ignore_errors=True)
        old.mkdir()
        format_1 = export_bundle(run.trained, old, rec.item_matrix, inputs, {}, format_version=1)
    v1 = run.bundle
    assert v1 is not None and v2 is not None and v1.name != v2.name
    return ItemBundles(v1, v2, format_1, dataset)


def model_dir_of(root: Path, bundles: ItemBundles) -> Path:
    """A MODEL_DIR holding both versions, LATEST naming v1."""
    root.mkdir(parents=True)
    for source in (bundles.v1, bundles.v2):
        shutil.copytree(source, root / source.name)
    b.write_latest(root, bundles.v1.name)
    return root


def add_format_1(model_dir: Path, bundles: ItemBundles) -> str:
    """The format 1 bundle into `model_dir`; its version."""
    shutil.copytree(bundles.format_1, model_dir / bundles.format_1.name)
    return bundles.format_1.name


@dataclass(frozen=True)
class Kind:
    """A category's users and items: a history of its most popular items, the attributes of
    an item like them, and those of an item of the largest other category."""

    category: str
    history: list[str]
    like: dict[str, Any]
    unlike: dict[str, Any]


def _tags(items: pd.DataFrame) -> list[str]:
    counts = Counter(tag for tags in items["tags"] for tag in str(tags).split("|"))
    return [tag for tag, _ in counts.most_common(2)]


def kind_of(dataset: Dataset, category: str, history: int = 20) -> Kind:
    items, interactions = dataset.items, dataset.interactions
    same = items[items["category"] == category]
    popular = interactions[interactions["item_id"].isin(same.index)]["item_id"].value_counts()
    other = items[items["category"] != category]
    other_category = str(other["category"].value_counts().index[0])
    unlike = other[other["category"] == other_category]
    return Kind(
        category,
        [str(i) for i in popular.index[:history]],
        {"category": category, "tags": _tags(same), "price": float(same["price"].median())},
        {
            "category": other_category,
            "tags": _tags(unlike),
            "price": float(unlike["price"].median()),
        },
    )


def categories(dataset: Dataset) -> list[str]:
    return sorted(str(c) for c in dataset.items["category"].unique())


# HTTP calls of the tests, through an in-process client (`helpers_app.serve`).

ADMIN = admin_headers()


async def recall(
    client: httpx.AsyncClient, history: list[str], k: int = 50, **extra: Any
) -> list[str]:
    body = {"user_id": "u-items", "k": k, "history": history, **extra}
    response = await client.post("/v1/recall", json=body)
    assert response.status_code == 200, response.text
    return [item["item_id"] for item in response.json()["items"]]


async def put(
    client: httpx.AsyncClient, item_id: str, attributes: dict[str, Any]
) -> dict[str, Any]:
    response = await client.put(
        f"/v1/items/{quote(item_id, safe='')}", json={"attributes": attributes}, headers=ADMIN
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def delete(client: httpx.AsyncClient, item_id: str) -> dict[str, Any]:
    response = await client.delete(f"/v1/items/{quote(item_id, safe='')}", headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def ready_version(client: httpx.AsyncClient, version: str) -> None:
    with anyio.fail_after(20):
        while (await client.get("/health/ready")).json().get("model_version") != version:
            await anyio.sleep(0.02)


async def state(client: httpx.AsyncClient, item_id: str) -> tuple[str, str | None]:
    body = (await client.get(f"/v1/items/{quote(item_id, safe='')}")).json()
    return body["status"], body["model_version"]

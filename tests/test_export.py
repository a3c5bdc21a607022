"""Bundle export and verification: layout, manifest, tower parity, tampering, versions."""

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from trainer_helpers import fast_config, small_dataset

from models import bundle as b
from models import tower_format
from models.evaluation import evaluate_recommender
from models.export import export_bundle
from models.features import FeatureEncoder
from models.pipeline import TrainingRun, run_training
from models.recommender import BundleRecommender, TwoTowerRecommender
from models.trained import item_embeddings

FILES = {
    "manifest.json",
    "towers.safetensors",
    "item_embeddings.npy",
    "item_ids.json",
    "feature_spec.json",
    "item_feature_spec.json",
    *b.OPTIONAL_FILES,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TrainingRun:
    out = tmp_path_factory.mktemp("artifacts")
    return run_training(small_dataset(), "last-10pct", fast_config(epochs=2), out)


@pytest.fixture(scope="module")
def bundle(run: TrainingRun) -> Path:
    assert run.bundle is not None
    return run.bundle


def manifest_of(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


def test_bundle_layout_and_latest(bundle: Path) -> None:
    root = bundle.parent
    assert {p.name for p in bundle.iterdir()} == FILES
    assert b.is_version_name(bundle.name)
    assert (root / "LATEST").read_text() == bundle.name + "\n"
    assert b.read_latest(root) == bundle.name
    assert b.list_versions(root) == [bundle.name]
    # No staging directory or temporary LATEST is left behind.
    assert sorted(p.name for p in root.iterdir()) == sorted(["LATEST", bundle.name])
    verified = b.verify_bundle(bundle)
    assert verified.version == bundle.name
    assert verified.tower_format == "safetensors" and verified.has_item_tower


def test_a_service_run_as_another_user_can_read_the_bundle(bundle: Path) -> None:
    # The trainer and the service often run as different users over one volume: LATEST and
    # the version directory must not keep mkstemp's 0600 / mkdtemp's 0700.
    assert (bundle.parent / "LATEST").stat().st_mode & 0o044 == 0o044
    assert bundle.stat().st_mode & 0o055 == 0o055
    for path in bundle.iterdir():
        assert path.stat().st_mode & 0o044 == 0o044, path.name


def test_manifest_has_the_design_fields(run: TrainingRun, bundle: Path) -> None:
    manifest = manifest_of(bundle)
    dataset = small_dataset()
    config = fast_config(epochs=2)
    assert run.split is not None
    index = {item: row for row, item in enumerate(dataset.items.index)}
    counts = np.bincount(run.split.train["item_id"].map(index), minlength=200)
    prior_max = config.temperature * run.trained.prior_weight * np.log1p(counts.max())
    assert manifest["format_version"] == 2
    assert manifest["tower_format"] == "safetensors"
    assert manifest["towers"] == {
        "architecture": dataclasses.asdict(config.tower) | {"hidden": [64]},
        "n_items": 200,
        "user_prior_folded": True,
        "item_prior_inverse_norm": pytest.approx(float(1 / np.sqrt(1 + prior_max**2)), rel=1e-6),
    }
    assert manifest["version"] == bundle.name
    created = datetime.fromisoformat(manifest["created_at"])
    assert created.utcoffset() == timedelta(0)
    assert bundle.name.startswith(created.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ-"))
    # out_dim 32 plus the popularity prior's two columns (its value and the unit-norm pad).
    assert (manifest["embedding_dim"], manifest["n_items"]) == (34, 200)
    assert manifest["metric"] == "inner_product"
    assert manifest["normalized"] is True
    embeddings = np.load(bundle / "item_embeddings.npy")
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert 0.0 <= manifest["parity_max_abs_diff"] <= 1e-4
    item_tower = manifest["item_tower"]
    assert item_tower["inputs"] == ["item_row", "category", "tags", "price"]
    assert item_tower["prior_folded"] is True
    assert 0.0 <= item_tower["parity_max_abs_diff"] <= 1e-4
    assert manifest["model"] == {"class": "TwoTower", **dataclasses.asdict(config.tower)} | {
        "hidden": [64]
    }
    training = manifest["training"]
    for key, value in dataclasses.asdict(config).items():
        if key != "tower":
            assert training[key] == value, key
    assert training["best_epoch"] == run.trained.best_epoch
    assert training["history"] == run.trained.history
    assert run.split is not None
    assert manifest["data"] == dataset.summary() | run.split.summary()
    assert manifest["evaluation"] == run.report
    assert set(manifest["evaluation"]["results"]["two_tower"]) >= {"recall@50", "ndcg@50"}
    assert manifest["item_features"] == run.trained.item_encoder.to_json()
    assert manifest["sha256"] == {
        name: hashlib.sha256((bundle / name).read_bytes()).hexdigest()
        for name in FILES - {"manifest.json"}
    }


def test_files_hold_the_trained_model(run: TrainingRun, bundle: Path) -> None:
    embeddings = np.load(bundle / "item_embeddings.npy", allow_pickle=False)
    assert embeddings.dtype == np.float32 and embeddings.shape == (200, 34)
    # [v, b, r] / M: the item tower's vector, the prior, the pad to a common length M.
    scale = 1.0 / np.linalg.norm(embeddings[:, :32], axis=1)
    np.testing.assert_allclose(scale, scale[0], rtol=1e-5)
    np.testing.assert_allclose(
        embeddings[:, :32] * scale[:, None], item_embeddings(run.trained), atol=1e-6
    )
    # The prior: temperature * weight * log1p(training count).
    assert run.split is not None
    index = {item: row for row, item in enumerate(small_dataset().items.index)}
    counts = np.bincount(run.split.train["item_id"].map(index), minlength=200)
    config = run.trained.config
    expected = config.temperature * run.trained.prior_weight * np.log1p(counts)
    np.testing.assert_allclose(embeddings[:, 32] * scale, expected, rtol=1e-5)
    item_ids = json.loads((bundle / "item_ids.json").read_text())
    assert item_ids == [str(i) for i in small_dataset().items.index]
    spec = json.loads((bundle / "feature_spec.json").read_text())
    assert spec == run.trained.user_encoder.to_json()
    assert {f["kind"] for f in spec["features"]} == {"categorical", "numeric", "history"}
    item_spec = json.loads((bundle / "item_feature_spec.json").read_text())
    assert item_spec == run.trained.item_encoder.to_json()
    assert [f["kind"] for f in item_spec["features"]] == ["categorical", "multi_hot", "numeric"]


def test_exported_user_tower_reproduces_the_eager_tower(run: TrainingRun, bundle: Path) -> None:
    dataset = small_dataset()
    verified = b.verify_bundle(bundle)
    scripted = tower_format.load_towers(verified.path, verified.manifest).user
    encoder = FeatureEncoder.from_json(
        verified.feature_spec, {item: row for row, item in enumerate(verified.item_ids)}
    )
    # Raw attributes and raw item ids, as the service receives them; plus a cold start.
    users = ["u0", "u5", "u17", "nobody"]
    rows = [
        {str(k): v for k, v in dataset.users.loc[u].items()} if u in dataset.users.index else {}
        for u in users
    ]
    recent = dataset.interactions.iloc[::-1]
    histories = [recent.loc[recent["user_id"] == u, "item_id"].tolist() for u in users]
    histories[1] = ["unknown-item", *histories[1]]
    inputs = {k: torch.from_numpy(v) for k, v in encoder.encode(rows, histories).items()}
    assert inputs["history"][3].sum() == 0 and (inputs["history"][:3, 0] > 0).all()
    eager = run.trained.model.user_tower.eval()
    with torch.no_grad():
        expected, got = eager(inputs), scripted(inputs)
    # The exported tower returns the unit vector [u, 1, 0] / sqrt(2): its 1 picks up the items'
    # prior column.
    assert got.shape == (4, 34) and got.dtype == torch.float32
    torch.testing.assert_close(got[:, :32] * 2**0.5, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[:, 32:], torch.tensor([[0.5**0.5, 0.0]] * 4))
    torch.testing.assert_close(got.norm(dim=1), torch.ones(4))


def test_bundle_recommender_has_no_training_serving_skew(run: TrainingRun, bundle: Path) -> None:
    dataset = small_dataset()
    assert run.split is not None
    train, test = run.split.train, run.split.test
    item_index = dataset.item_index()
    from_bundle = BundleRecommender(bundle, dataset.users, item_index)
    from_bundle.fit(train, item_index)
    in_memory = TwoTowerRecommender(run.trained, dataset.users)
    in_memory.fit(train, item_index)
    users = [*sorted(test["user_id"].unique())[:50], "nobody"]
    np.testing.assert_allclose(from_bundle.score(users), in_memory.score(users), rtol=0, atol=1e-5)
    result = evaluate_recommender(from_bundle, train, test, item_index)
    expected = run.results["two_tower"].means
    assert result.means.keys() == expected.keys()
    for metric, value in expected.items():
        assert result.means[metric] == pytest.approx(value, abs=1e-9), metric


def test_a_capped_bundle_reads_the_newest_ids_as_the_service_stores_them(
    run: TrainingRun, bundle: Path
) -> None:
    """Under HISTORY_CAP=N the service stores a user's newest N ids, known to the bundle or
    not, and its tower reads the known ones among them; `evaluate --history-cap` dropped the
    unknown ids first and read older known items the service never holds."""
    dataset = small_dataset()
    assert run.split is not None
    train = run.split.train
    item_index = dataset.item_index()
    user = str(train["user_id"].iloc[0])
    newest = pd.DataFrame(
        {"user_id": [user], "item_id": ["not-in-the-bundle"], "timestamp": [10**10]}
    )
    capped = BundleRecommender(bundle, dataset.users, item_index, history_cap=1)
    capped.fit(pd.concat([train, newest]), item_index)
    without_history = BundleRecommender(bundle, dataset.users, item_index)
    without_history.fit(train[train["user_id"] != user], item_index)
    np.testing.assert_allclose(capped.score([user]), without_history.score([user]), atol=1e-6)


# --- tampering ------------------------------------------------------------------------------


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def edit_json(name: str, change: Callable[[Any], Any]) -> Callable[[Path], object]:
    def edit(bundle: Path) -> None:
        path = bundle / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return edit


def swap_first_ids(ids: list[str]) -> list[str]:
    return [ids[1], ids[0], *ids[2:]]


def unknown_vocabulary(spec: dict[str, Any]) -> dict[str, Any]:
    spec["features"][0]["vocabulary"] = {"tampered": 1}
    return spec


def sha(change: Callable[[dict[str, str]], object]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def edit(manifest: dict[str, Any]) -> dict[str, Any]:
        change(manifest["sha256"])
        return manifest

    return edit


def with_value(key: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda manifest: manifest | {key: value}


TAMPERING: list[tuple[str, Callable[[Path], object], str]] = [
    ("embeddings byte", lambda p: flip_last_byte(p / "item_embeddings.npy"),
     "checksum mismatch for item_embeddings.npy"),
    ("towers byte", lambda p: flip_last_byte(p / "towers.safetensors"),
     "checksum mismatch for towers.safetensors"),
    ("towers appended", lambda p: (p / "towers.safetensors").write_bytes(
        (p / "towers.safetensors").read_bytes() + b"\0"),
     "checksum mismatch for towers.safetensors"),
    ("item spec", edit_json("item_feature_spec.json", unknown_vocabulary),
     "checksum mismatch for item_feature_spec.json"),
    ("towers missing", lambda p: (p / "towers.safetensors").unlink(),
     "missing towers.safetensors"),
    ("tower format", edit_json("manifest.json", with_value("tower_format", "onnx")),
     "unknown tower_format 'onnx'"),
    ("item ids", edit_json("item_ids.json", swap_first_ids), "checksum mismatch for item_ids.json"),
    ("feature spec", edit_json("feature_spec.json", unknown_vocabulary),
     "checksum mismatch for feature_spec.json"),
    ("sha swapped", edit_json("manifest.json", sha(
        lambda s: s.update({"item_ids.json": s["feature_spec.json"]}))),
     "checksum mismatch for item_ids.json"),
    ("sha missing", edit_json("manifest.json", sha(lambda s: s.pop("towers.safetensors"))),
     "sha256 must list exactly"),
    ("sha extra", edit_json("manifest.json", sha(lambda s: s.update({"x.bin": "00"}))),
     "sha256 must list exactly"),
    ("sha not a dict", edit_json("manifest.json", with_value("sha256", ["a"])),
     "sha256 must list exactly"),
    ("version", edit_json("manifest.json", with_value("version", "20000101T000000Z-abcdef")),
     "manifest names version"),
    ("format", edit_json("manifest.json", with_value("format_version", 3)),
     r"format_version 3; this version reads 1, 2 \(written by a newer trainer"),
    ("format 1 with format 2 files", edit_json("manifest.json", with_value("format_version", 1)),
     "sha256 must list exactly"),
    ("dim", edit_json("manifest.json", with_value("embedding_dim", 16)), "manifest says float32"),
    ("n_items", edit_json("manifest.json", with_value("n_items", 201)), "manifest says float32"),
    ("manifest garbage", lambda p: (p / "manifest.json").write_text("{not json"),
     "manifest.json is not valid JSON"),
    ("manifest missing", lambda p: (p / "manifest.json").unlink(), "missing manifest.json"),
    ("file missing", lambda p: (p / "item_ids.json").unlink(), "missing item_ids.json"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("tamper", "message"), [(t, m) for _, t, m in TAMPERING], ids=[n for n, _, _ in TAMPERING]
)
def test_tampered_bundle_is_refused(
    bundle: Path, tmp_path: Path, tamper: Callable[[Path], object], message: str
) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / bundle.name))
    b.verify_bundle(copy)
    tamper(copy)
    with pytest.raises(b.BundleError, match=message):
        b.verify_bundle(copy)
    with pytest.raises(b.BundleError):
        BundleRecommender(copy, small_dataset().users, {})


def rehash(bundle: Path) -> None:
    """Make the manifest agree with the files again: only the content checks are left."""
    manifest = manifest_of(bundle)
    manifest["sha256"] = {name: b.sha256_file(bundle / name) for name in manifest["sha256"]}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_pickled_embeddings_are_refused_even_with_matching_checksums(
    bundle: Path, tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / bundle.name))
    objects = np.empty((200, 32), dtype=object)
    objects[:] = 0.0
    np.save(copy / "item_embeddings.npy", objects, allow_pickle=True)
    rehash(copy)
    with pytest.raises(ValueError, match="allow_pickle"):
        np.load(copy / "item_embeddings.npy", allow_pickle=False)
    with pytest.raises(b.BundleError, match=r"not a plain \.npy array"):
        b.verify_bundle(copy)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: np.save(p / "item_embeddings.npy", np.zeros((200, 32))), "float64"),
        (
            lambda p: np.save(p / "item_embeddings.npy", np.zeros((32, 200), np.float32)),
            "(32, 200)",
        ),
        (lambda p: (p / "item_ids.json").write_text(json.dumps(["a"] * 200)), "duplicate ids"),
        (lambda p: (p / "item_ids.json").write_text(json.dumps(["a", "b"])), "of 200 string ids"),
        (lambda p: (p / "item_ids.json").write_text('{"a": 1}'), "list of 200 string ids"),
        (lambda p: (p / "item_ids.json").write_text("[1, 2"), "item_ids.json is not valid JSON"),
    ],
)
def test_inconsistent_content_is_refused_even_with_matching_checksums(
    bundle: Path, tmp_path: Path, write: Callable[[Path], object], message: str
) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / bundle.name))
    write(copy)
    rehash(copy)
    with pytest.raises(b.BundleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        b.verify_bundle(copy)


def _with_row(bundle: Path, to: Path, row: int, value: float, *, normalized: bool) -> Path:
    """A copy of `bundle` with item vector `row` set to `value` and the manifest's
    `normalized` flag as given, checksums matching."""
    copy = Path(shutil.copytree(bundle, to / bundle.name))
    vectors = np.load(copy / "item_embeddings.npy")
    vectors[row] = value
    np.save(copy / "item_embeddings.npy", vectors)
    manifest = manifest_of(copy) | {"normalized": normalized}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    rehash(copy)
    return copy


@pytest.mark.parametrize(
    ("value", "normalized", "message"),
    [
        (np.nan, True, "row 5 is not unit-length"),
        (1e30, True, "row 5 is not unit-length"),  # it would top every user's list
        (0.5, True, "row 5 is not unit-length"),
        (np.inf, False, "row 5 is not finite"),
    ],
)
def test_item_vectors_that_break_the_contract_are_refused(
    bundle: Path, tmp_path: Path, value: float, normalized: bool, message: str
) -> None:
    copy = _with_row(bundle, tmp_path, 5, value, normalized=normalized)
    with pytest.raises(b.BundleError, match=message):
        b.verify_bundle(copy)


def test_vectors_a_manifest_does_not_call_normalised_need_only_be_finite(
    bundle: Path, tmp_path: Path
) -> None:
    """Bundles of earlier versions with a popularity prior held `[v, b]`, not unit vectors."""
    copy = _with_row(bundle, tmp_path, 5, 0.5, normalized=False)
    assert b.verify_bundle(copy).item_embeddings[5, 0] == 0.5


def test_missing_bundle_is_refused(tmp_path: Path) -> None:
    with pytest.raises(b.BundleError, match="does not exist"):
        b.verify_bundle(tmp_path / "20260101T000000Z-abcdef")


# --- versions -------------------------------------------------------------------------------


def file_hashes(path: Path) -> dict[str, str]:
    return {p.name: b.sha256_file(p) for p in path.iterdir()}


def test_two_trainings_make_two_versions(tmp_path: Path) -> None:
    dataset = small_dataset("synthetic:seed=2,users=60,items=40")
    root = tmp_path / "artifacts"
    first = run_training(dataset, "none", fast_config(epochs=1), root).bundle
    assert first is not None
    before = file_hashes(first)
    second = run_training(dataset, "none", fast_config(epochs=1, seed=1), root).bundle
    assert second is not None and second != first
    assert second.parent == first.parent == root
    assert set(b.list_versions(root)) == {first.name, second.name}
    assert b.read_latest(root) == second.name
    assert file_hashes(first) == before
    assert b.verify_bundle(first).version == first.name
    assert b.verify_bundle(second).version == second.name
    assert manifest_of(first)["data"]["split"] == "none"
    assert manifest_of(first)["evaluation"] is None


def test_exporting_the_same_model_twice_never_overwrites(run: TrainingRun, tmp_path: Path) -> None:
    dataset = small_dataset()
    rec = TwoTowerRecommender(run.trained, dataset.users)
    inputs = rec.user_inputs(["u0", "nobody"])
    matrix = rec.item_matrix
    first = export_bundle(run.trained, tmp_path, matrix, inputs, {})
    second = export_bundle(run.trained, tmp_path, matrix, inputs, {})
    assert first != second
    assert (first / "item_embeddings.npy").read_bytes() == (
        second / "item_embeddings.npy"
    ).read_bytes()
    assert b.read_latest(tmp_path) == second.name


@pytest.mark.parametrize("tower", ["user", "item"])
def test_an_exported_tower_that_disagrees_is_never_exported(
    run: TrainingRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tower: str
) -> None:
    dataset = small_dataset()
    rec = TwoTowerRecommender(run.trained, dataset.users)
    inputs, matrix = rec.user_inputs(["u0", "nobody"]), rec.item_matrix
    good = export_bundle(run.trained, tmp_path, matrix, inputs, {})
    save_towers = tower_format.save_towers

    def drifted(directory: Path, towers: tower_format.Towers) -> None:
        # The item tower's own layers: the item-id table is the user tower's too.
        drifting = (
            towers.user if tower == "user" else getattr(towers.item, "tower", towers.item).body
        )
        with torch.no_grad():
            for parameter in drifting.parameters():
                parameter.add_(0.1)
        save_towers(directory, towers)

    monkeypatch.setattr(tower_format, "save_towers", drifted)
    with pytest.raises(b.BundleError, match=f"{tower} tower parity check failed"):
        export_bundle(run.trained, tmp_path, matrix, inputs, {})
    # Nothing half-written is left, and LATEST still names the good bundle.
    assert b.list_versions(tmp_path) == [good.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["LATEST", good.name])
    assert b.read_latest(tmp_path) == good.name


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "..",
        "/etc",
        "/tmp/20261122T113000Z-3f9a1c",
        "x/../20261122T113000Z-3f9a1c",
        "20261122T113000Z-3f9a1c/../../x",
        "20261122T113000Z-3f9a1c\n",
        "20261122T113000Z-3F9A1C",
        "20261122T113000-3f9a1c",
        "latest",
        "",
    ],
)
def test_version_dir_rejects_anything_but_a_version_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(b.BundleError, match="invalid version name"):
        b.version_dir(tmp_path, name)
    with pytest.raises(b.BundleError, match="invalid version name"):
        b.write_latest(tmp_path, name)
    assert not (tmp_path / "LATEST").exists()


def test_version_names_and_latest(tmp_path: Path) -> None:
    assert (
        b.version_dir(tmp_path, "20261122T113000Z-3f9a1c") == tmp_path / "20261122T113000Z-3f9a1c"
    )
    with pytest.raises(b.BundleError, match="no LATEST"):
        b.read_latest(tmp_path)
    (tmp_path / "LATEST").write_text("../../etc\n")
    with pytest.raises(b.BundleError, match=r"LATEST does not hold a version name$"):
        b.read_latest(tmp_path)
    b.write_latest(tmp_path, "20261122T113000Z-3f9a1c")
    assert b.read_latest(tmp_path) == "20261122T113000Z-3f9a1c"
    assert [p.name for p in tmp_path.iterdir()] == ["LATEST"]

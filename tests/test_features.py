"""The shared feature encoder: fitting, every kind's encoding, history, the spec round trip."""

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.config import IndexConfig
from app.model import ServingModel
from models.dataset import ColumnSpec
from models.feature_spec import HISTORY, Z_CLIP, Feature, FeatureSpecError, fit_feature
from models.features import FeatureEncoder
from models.pipeline import run_training
from models.sources import load_dataset
from models.train_config import TrainConfig

ITEMS = {"a": 0, "b": 1, "c": 2, "d": 3}
GENDER = Feature("gender", "categorical", vocabulary={"F": 1, "M": 2})
GENRES = Feature("genres", "multi_hot", vocabulary={"Action": 1, "Comedy": 2}, max_values=2)
INCOME = Feature("income", "numeric", transform="standard", mean=10.0, std=4.0)
VISITS = Feature("visits", "numeric", transform="log", mean=1.0, std=2.0)
AGE = Feature("age", "numeric", transform="bucket", boundaries=[18.0, 30.0])


def encoder(length: int = 3) -> FeatureEncoder:
    return FeatureEncoder([GENDER, GENRES, INCOME, VISITS, AGE], length, ITEMS)


# --- fitting ------------------------------------------------------------------------------


def test_fit_categorical_vocabulary_by_frequency_then_value() -> None:
    values = ["b", "a", "c", "a", None, float("nan"), "b", "z"]
    feature = fit_feature("x", "categorical", values)
    assert feature.vocabulary == {"a": 1, "b": 2, "c": 3, "z": 4}
    assert feature.cardinality == 5
    rare_dropped = fit_feature("x", "categorical", values, min_count=2)
    assert rare_dropped.vocabulary == {"a": 1, "b": 2}


def test_fit_multi_hot_from_strings_and_lists() -> None:
    feature = fit_feature("g", "multi_hot", ["x|y", ["y"], None, "y|z|x", ""])
    assert feature.vocabulary == {"y": 1, "x": 2, "z": 3}
    assert feature.max_values == 3
    assert fit_feature("g", "multi_hot", [None, ""]).max_values == 1


def test_fit_numeric_transforms() -> None:
    standard = fit_feature("n", "numeric", [1.0, 2.0, 3.0, None, "oops"])
    assert standard.mean == 2.0
    assert standard.std == pytest.approx(math.sqrt(2 / 3))
    constant = fit_feature("n", "numeric", [5.0, 5.0])
    assert (constant.mean, constant.std) == (5.0, 0.0)  # never varied: encodes as 0
    assert fit_feature("n", "numeric", [None, "?"]).std == 0.0
    log = fit_feature("n", "numeric", [0.0, math.e - 1], transform="log")
    assert (log.mean, log.std) == pytest.approx((0.5, 0.5))
    bucket = fit_feature("n", "numeric", [1.0, 2.0, 3.0, 4.0], transform="bucket", buckets=2)
    assert bucket.boundaries == [2.5]
    assert bucket.cardinality == 3
    assert not bucket.is_dense and standard.is_dense


def test_fit_rejects_unknown_transform_and_kind() -> None:
    with pytest.raises(FeatureSpecError, match="unknown numeric transform"):
        fit_feature("n", "numeric", [1.0], transform="sqrt")
    with pytest.raises(FeatureSpecError, match="cannot fit kind"):
        fit_feature("n", "history", [1.0])


# --- encoding -----------------------------------------------------------------------------


def test_categorical_unknown_and_missing_are_zero() -> None:
    out = encoder().encode_column(GENDER, ["M", "F", "X", None, float("nan"), 1])
    assert out.dtype == np.int64
    assert out.tolist() == [2, 1, 0, 0, 0, 0]


def test_multi_hot_strings_lists_padding_and_unknowns() -> None:
    values: list[Any] = [
        "Comedy|Action",
        ["Action"],
        "Horror|Comedy",  # unknown value dropped, not encoded as 0 in the middle
        "Action|Comedy|Action",  # truncated to max_values
        None,
        "",
        ["Horror", "Drama"],
        {"Action": 0, "Comedy": 0},  # a stored map of weights: no value it can read
    ]
    out = encoder().encode_column(GENRES, values)
    assert out.dtype == np.int64
    assert out.tolist() == [[2, 1], [1, 0], [2, 0], [1, 2], [0, 0], [0, 0], [0, 0], [0, 0]]


def test_numeric_standard_and_log_missing_is_zero() -> None:
    enc = encoder()
    standard = enc.encode_column(INCOME, [14.0, "6", None, float("nan"), "abc", True, math.inf])
    assert standard.dtype == np.float32
    assert standard.tolist() == [1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    log = enc.encode_column(VISITS, [math.e - 1, -5.0, None])
    assert log.dtype == np.float32
    # log1p(e - 1) = 1 -> (1 - 1) / 2; negatives clip to log1p(0) = 0 -> (0 - 1) / 2.
    np.testing.assert_allclose(log, [0.0, -0.5, 0.0], atol=1e-7)


def test_numeric_values_far_outside_training_are_clipped() -> None:
    """A wild value (1e300 in a request) would overflow float32: inf in the user vector,
    NaN in every score. Standardised values stop at +-Z_CLIP, training and serving alike."""
    enc = encoder()
    standard = enc.encode_column(INCOME, [1e300, -1e300, 10.0 + 4.0 * 9.5])
    assert standard.tolist() == [Z_CLIP, -Z_CLIP, 9.5]
    assert enc.encode_column(VISITS, [1e300]).tolist() == [Z_CLIP]


def test_a_numeric_feature_constant_in_training_moves_no_vector(tmp_path: Path) -> None:
    """Every training row encoded a constant column as 0, so its weights never left their
    random start, and a served value other than the constant (z up to the clip) pushed the
    user vector along them (cosine 0.78 at the clip). It now encodes as 0 whatever the value,
    in training and at serving, through the real trainer and the service's model."""
    constant = fit_feature("score", "numeric", [2.5, 2.5, None])
    assert FeatureEncoder([constant]).encode_column(constant, [2.5, 1e6, -3, None]).tolist() == [
        0.0,
        0.0,
        0.0,
        0.0,
    ]
    dataset = load_dataset("synthetic:seed=1,users=120,items=80")
    users = dataset.users.assign(score=2.5)
    dataset = dataclasses.replace(
        dataset, users=users, user_columns=(*dataset.user_columns, ColumnSpec("score", "numeric"))
    )
    config = TrainConfig(epochs=1, validation_fraction=0.0, batch_size=256)
    bundle = run_training(dataset, "none", config, tmp_path).bundle
    assert bundle is not None
    model = ServingModel.load(bundle, IndexConfig())
    row = dataset.users.iloc[0].to_dict()
    vectors = model.encode([row, row | {"score": 1e6}, row | {"score": -40.0}], [["i1"]] * 3)
    np.testing.assert_array_equal(vectors[0], vectors[1])
    np.testing.assert_array_equal(vectors[0], vectors[2])


def test_numeric_bucket_edges_go_up() -> None:
    out = encoder().encode_column(AGE, [5, 18, 17.9, 29.99, 30, 99, None, "x"])
    assert out.dtype == np.int64
    assert out.tolist() == [1, 2, 1, 2, 3, 3, 0, 0]
    assert AGE.cardinality == 4
    assert out.max() < AGE.cardinality


def test_history_newest_first_truncation_unknown_skipped_padding() -> None:
    enc = encoder(length=3)
    out = enc.encode_history([["c", "zz", "a", "b", "d"], ["b"], [], ["zz", "yy"]])
    assert out.dtype == np.int64
    # Unknown ids are dropped before truncation, so the row still holds 3 known items.
    assert out.tolist() == [[3, 1, 2], [2, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_a_history_mapped_once_encodes_as_its_item_ids() -> None:
    enc = encoder(length=3)
    histories = [["c", "zz", "a", "b", "d"], ["b"], [], ["zz", "yy"]]
    rows = [enc.history_rows(h) for h in histories]
    assert rows == [[2, 0, 1, 3], [1], [], []]  # catalogue rows, unknown ids skipped
    by_rows = enc.encode([{}] * 4, history_rows=rows)
    np.testing.assert_array_equal(by_rows[HISTORY], enc.encode_history(histories))
    np.testing.assert_array_equal(by_rows[HISTORY], enc.encode([{}] * 4, histories)[HISTORY])


def test_encode_rows_layout_and_missing_keys() -> None:
    enc = encoder(length=2)
    batch = enc.encode(
        [{"gender": "F", "genres": "Action", "income": 18, "age": 40, "extra": 1}, {}],
        [["b", "a", "c"], []],
    )
    assert list(batch) == ["gender", "genres", "income", "visits", "age", HISTORY]
    assert enc.input_names == tuple(batch)
    assert batch["gender"].tolist() == [1, 0]
    assert batch["genres"].tolist() == [[1, 0], [0, 0]]
    assert batch["income"].tolist() == [2.0, 0.0]
    assert batch["visits"].tolist() == [0.0, 0.0]
    assert batch["age"].tolist() == [3, 0]
    assert batch[HISTORY].tolist() == [[2, 1], [0, 0]]
    no_history = enc.encode([{"gender": "M"}])
    assert no_history[HISTORY].tolist() == [[0, 0]]


def test_encode_columns_missing_column_is_missing() -> None:
    enc = FeatureEncoder([GENDER, INCOME])
    out = enc.encode_columns({"gender": ["M", "F"]}, batch_size=2)
    assert out["gender"].tolist() == [2, 1]
    assert out["income"].tolist() == [0.0, 0.0]
    assert HISTORY not in out


def test_encoder_rejects_bad_feature_sets() -> None:
    with pytest.raises(FeatureSpecError, match="unique"):
        FeatureEncoder([GENDER, GENDER])
    with pytest.raises(FeatureSpecError, match="unique"):
        FeatureEncoder([Feature(HISTORY, "categorical")])
    with pytest.raises(FeatureSpecError, match="item index"):
        FeatureEncoder([GENDER], history_length=5)


# --- spec round trip ----------------------------------------------------------------------


def test_spec_json_layout() -> None:
    spec = encoder(length=4).to_json()
    assert spec["format_version"] == 1
    by_name = {f["name"]: f for f in spec["features"]}
    assert by_name["gender"] == {
        "name": "gender",
        "kind": "categorical",
        "vocabulary": {"F": 1, "M": 2},
    }
    assert by_name["income"] == {
        "name": "income",
        "kind": "numeric",
        "transform": "standard",
        "mean": 10.0,
        "std": 4.0,
    }
    assert by_name["age"] == {
        "name": "age",
        "kind": "numeric",
        "transform": "bucket",
        "boundaries": [18.0, 30.0],
    }
    assert by_name[HISTORY] == {
        "name": HISTORY,
        "kind": "history",
        "length": 4,
        "vocabulary": "item_ids.json",
    }
    assert [f["name"] for f in spec["features"]][-1] == HISTORY


def test_round_trip_encodes_identically(tmp_path: Path) -> None:
    fitted = [
        fit_feature("gender", "categorical", ["F", "M", "M", None]),
        fit_feature("genres", "multi_hot", ["Action|Comedy", "Drama", None]),
        fit_feature("income", "numeric", [1.0, 5.0, 9.0]),
        fit_feature("visits", "numeric", [0.0, 3.0, 30.0], transform="log"),
        fit_feature("age", "numeric", [10, 20, 30, 40, 50], transform="bucket", buckets=4),
    ]
    original = FeatureEncoder(fitted, 3, ITEMS)
    rows: list[dict[str, Any]] = [
        {"gender": "M", "genres": ["Drama", "Action"], "income": 4, "visits": 7, "age": 35},
        {"gender": "?", "genres": "Comedy|Horror", "income": None, "age": 30},
        {},
    ]
    histories = [["d", "c", "x", "b", "a"], ["a"], []]
    loaded = FeatureEncoder.from_json(json.loads(json.dumps(original.to_json())), ITEMS)
    original.save(tmp_path / "feature_spec.json")
    from_file = FeatureEncoder.load(tmp_path / "feature_spec.json", ["a", "b", "c", "d"])
    expected = original.encode(rows, histories)
    for other in (loaded, from_file):
        assert other.to_json() == original.to_json()
        assert other.input_names == original.input_names
        got = other.encode(rows, histories)
        assert list(got) == list(expected)
        for name, values in expected.items():
            assert got[name].dtype == values.dtype
            np.testing.assert_array_equal(got[name], values)


def _spec(*features: Any, version: Any = 1) -> dict[str, Any]:
    return {"format_version": version, "features": list(features)}


CAT = {"name": "g", "kind": "categorical", "vocabulary": {"F": 1}}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_spec(CAT, version=2), "unsupported feature spec version 2"),
        ({"features": [CAT]}, "unsupported feature spec version None"),
        ({"format_version": 1}, "malformed"),
        (_spec({"name": "g", "vocabulary": {}}), "malformed"),
        (_spec({"kind": "categorical"}), "malformed"),
        (_spec({"name": "g", "kind": "embedding"}), "unknown feature kind 'embedding'"),
        (_spec({"name": HISTORY, "kind": "history"}), "malformed"),
        (_spec({"name": HISTORY, "kind": "history", "length": "fifty"}), "malformed"),
        ({"format_version": 1, "features": 3}, "malformed"),
        (_spec("gender"), "malformed"),
        (_spec(CAT, CAT), "unique"),
        (_spec({"name": HISTORY, "kind": "categorical", "vocabulary": {}}), "unique"),
        (_spec({"name": HISTORY, "kind": "history", "length": 3}), "item index"),
        (_spec({"name": HISTORY, "kind": "history", "length": -1}), "negative"),
        # Indices past the model's tables, or negative ones, fail on a user's request only.
        (_spec(CAT | {"vocabulary": {"F": 1, "M": -3}}), "indices must be 1..n"),
        (_spec(CAT | {"vocabulary": {"F": 1, "M": 1}}), "indices must be 1..n"),
        (_spec(CAT | {"vocabulary": {"F": 2}}), "indices must be 1..n"),
        (_spec(CAT | {"vocabulary": {"F": "1"}}), "malformed|1..n"),
        (_spec(CAT | {"kind": "multi_hot", "max_values": 0}), "max_values"),
        (_spec({"name": "x", "kind": "numeric", "transform": "sqrt"}), "unknown transform"),
        (_spec({"name": "x", "kind": "numeric", "std": -1.0}), "std >= 0"),
        (_spec({"name": "x", "kind": "numeric", "mean": math.nan}), "finite mean"),
        (_spec({"name": "x", "kind": "numeric", "boundaries": [3.0, 1.0]}), "increasing"),
        (_spec({"name": "x", "kind": "numeric", "boundaries": [1.0, math.inf]}), "finite"),
    ],
)
def test_malformed_spec_is_refused(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(FeatureSpecError, match=message):
        FeatureEncoder.from_json(spec)

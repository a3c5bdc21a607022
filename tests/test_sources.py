from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.dataset import DataError, Dataset
from models.sources import load_dataset

ML_1M_HALF = Path(__file__).resolve().parents[2] / "shared/data/ml-1m-half"
SPLIT_2003 = int(pd.Timestamp("2003-01-01", tz="UTC").timestamp())


def check_contract(ds: Dataset) -> None:
    inter = ds.interactions
    assert list(inter.columns) == ["user_id", "item_id", "timestamp"]
    assert inter["timestamp"].dtype == np.int64
    assert pd.api.types.is_string_dtype(inter["user_id"])
    assert pd.api.types.is_string_dtype(inter["item_id"])
    assert inter["timestamp"].is_monotonic_increasing
    assert inter.index.equals(pd.RangeIndex(len(inter)))
    assert set(inter["user_id"]) <= set(ds.users.index)
    assert set(inter["item_id"]) <= set(ds.items.index)
    assert ds.users.index.name == "user_id" and ds.items.index.name == "item_id"
    assert ds.users.index.is_unique and ds.items.index.is_unique
    assert list(ds.users.columns) == [c.name for c in ds.user_columns]
    assert list(ds.items.columns) == [c.name for c in ds.item_columns]
    for table, specs in ((ds.users, ds.user_columns), (ds.items, ds.item_columns)):
        for spec in specs:
            if spec.kind == "numeric":
                assert table[spec.name].dtype == np.float64
            else:
                assert pd.api.types.is_string_dtype(table[spec.name])


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def load_logged(source: str, caplog: pytest.LogCaptureFixture) -> tuple[Dataset, list[str]]:
    """Load `source`; return the dataset and the warnings the sources logged meanwhile."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models.sources"):
        ds = load_dataset(source)
    return ds, [r.getMessage() for r in caplog.records if r.name.startswith("models.sources")]


def not_numbers(path: Path, column: str, count: int, first_line: int) -> str:
    cells = "cell is not a number" if count == 1 else "cells are not numbers"
    return f"{path}: {column!r}: {count} {cells} (first at line {first_line}); read as missing"


# --- source strings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("nope:/tmp", "valid forms"),
        ("ml-1m", "needs a directory"),
        ("ml-1m:/no/such/dir", "not a directory"),
        ("synthetic:colour=3", "bad parameter"),
        ("synthetic:seed=x", "must be an integer"),
        ("synthetic:abc", "must be an integer"),
        ("synthetic:users=0", "users must be at least 1"),
        ("synthetic:seed=-1", "synthetic: seed must be at least 0"),
        ("synthetic:seed=1,seed=2", "given twice"),
        ("synthetic:items=5,topics=9", "topics must be between"),
    ],
)
def test_bad_source_strings(source: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(source)


# --- synthetic ----------------------------------------------------------------------------


def test_synthetic_default_and_contract() -> None:
    ds = load_dataset("synthetic")
    check_contract(ds)
    assert ds.name == "synthetic"
    assert (len(ds.users), len(ds.items)) == (2000, 1000)
    per_user = ds.interactions.groupby("user_id").size()
    assert 25 <= per_user.median() <= 60
    assert not ds.interactions.duplicated(["user_id", "item_id"]).any()
    assert not ds.users.isna().any().any() and not ds.items.isna().any().any()


def test_synthetic_is_determined_by_seed() -> None:
    a = load_dataset("synthetic:seed=4,users=300,items=200")
    b = load_dataset("synthetic:seed=4,users=300,items=200")
    c = load_dataset("synthetic:5")
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.users, b.users)
    pd.testing.assert_frame_equal(a.items, b.items)
    d = load_dataset("synthetic:seed=5,users=300,items=200")
    assert not a.interactions.equals(d.interactions)
    assert not a.items.equals(d.items)
    assert c.name == "synthetic:5" and len(c.users) == 2000


def test_synthetic_sizes_are_honoured() -> None:
    ds = load_dataset("synthetic:seed=1,users=150,items=7000,topics=7,per_user=12")
    check_contract(ds)
    assert (len(ds.users), len(ds.items)) == (150, 7000)
    assert ds.interactions["user_id"].nunique() == 150
    per_user = ds.interactions.groupby("user_id").size()
    assert per_user.max() <= 16 and per_user.mean() >= 8
    assert ds.items["category"].nunique() == 3  # topics // 2


def test_synthetic_timestamps_span_the_2003_split() -> None:
    inter = load_dataset("synthetic:seed=2,users=500").interactions
    assert inter["timestamp"].min() >= int(pd.Timestamp("2002-01-01", tz="UTC").timestamp())
    assert inter["timestamp"].max() < int(pd.Timestamp("2004-01-01", tz="UTC").timestamp())
    train_users = set(inter.loc[inter["timestamp"] < SPLIT_2003, "user_id"])
    test_users = set(inter.loc[inter["timestamp"] >= SPLIT_2003, "user_id"])
    assert len(train_users & test_users) > 100
    stamps = inter.sort_values(["user_id", "timestamp"], kind="stable")
    assert (stamps.groupby("user_id")["timestamp"].diff().dropna() > 0).all()


def test_synthetic_has_planted_structure() -> None:
    ds = load_dataset("synthetic:seed=0,users=1000")
    inter = ds.interactions.assign(
        category=ds.items["category"].loc[ds.interactions["item_id"]].array
    )
    share = inter["category"].value_counts(normalize=True)
    chance = float((share**2).sum())
    by_user = inter.groupby("user_id", sort=False)["category"]
    same_as_previous = (inter["category"] == by_user.shift()).to_numpy()[by_user.cumcount() > 0]
    assert same_as_previous.mean() > 3 * chance
    top_share = by_user.agg(lambda c: c.value_counts(normalize=True).iloc[0])
    assert top_share.mean() > 3 * share.iloc[0]
    popularity = inter["item_id"].value_counts()
    assert popularity.iloc[:50].sum() > 0.1 * len(inter)  # 5 % of items, > 10 % of traffic


@pytest.mark.slow
def test_synthetic_million_item_catalogue() -> None:
    # The serving benchmark's 1M catalogue (its generation time is the benchmark's business).
    ds = load_dataset("synthetic:seed=0,users=2000,items=1000000,per_user=10")
    assert len(ds.items) == 1_000_000
    assert ds.items.index.is_unique
    assert ds.interactions["item_id"].isin(ds.items.index).all()


# --- MovieLens-1M -------------------------------------------------------------------------


def ml_1m_fixture(directory: Path, ratings: str | None = None) -> Path:
    write(directory / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072-1234\n")
    write(
        directory / "movies.dat",
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Café Olé (2000)::Drama\n"
        "3::No Year::Comedy\n",
        encoding="latin-1",
    )
    default = "1::1::5::978300760\n2::2::3::978300000\n2::9::4::978300100\n1::2::4::978300000\n"
    write(directory / "ratings.dat", default if ratings is None else ratings)
    return directory


def test_ml_1m(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds, warned = load_logged(f"ml-1m:{ml_1m_fixture(tmp_path)}", caplog)
    check_contract(ds)
    assert warned == [not_numbers(tmp_path / "movies.dat", "year", 1, 3)]  # "No Year"
    assert ds.interactions.to_dict("list") == {
        "user_id": ["2", "1", "2", "1"],
        "item_id": ["2", "2", "9", "1"],
        "timestamp": [978300000, 978300000, 978300100, 978300760],
    }
    assert ds.users.loc["2"].to_dict() == {
        "gender": "M", "age": "56", "occupation": "16", "zip1": "7", "zip3": "700"
    }  # fmt: skip
    assert ds.items.loc["1", "genres"] == "Animation|Children's|Comedy"
    assert ds.items["year"].tolist()[:2] == [1995.0, 2000.0]
    assert ds.items["year"].isna().tolist() == [False, False, True, True]
    assert ds.items.index.tolist() == ["1", "2", "3", "9"]  # 9: rated, absent from movies.dat
    assert ds.items.loc["9"].isna().all()


@pytest.mark.parametrize(
    ("ratings", "message"),
    [
        ("1::1::5::978300760\n1::2::5\n", r"ratings.dat: line 2: expected 4 fields, found 3"),
        ("1::1::5::978300760\n\n1::2::5::1::2\n", r"line 3: expected 4 fields, found 5"),
        ("1::1::5::978300760\n1::2::5::soon\n", r"line 2: 'timestamp' is not a 64-bit integer"),
        ("1::1::5::978300760\n::2::5::978300760\n", r"line 2: empty 'user_id'"),
        # Unused, but a rating that is not one is a malformed row (it loaded silently).
        ("1::1::5::978300760\n1::2::x::978300760\n", r"line 2: 'rating' is not a 64-bit integer"),
    ],
)
def test_ml_1m_malformed_rows(tmp_path: Path, ratings: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(f"ml-1m:{ml_1m_fixture(tmp_path, ratings)}")


def test_ml_1m_titles_without_a_year(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ml_1m_fixture(tmp_path, "".join(f"1::{i}::5::97830076{i}\n" for i in range(1, 6)))
    write(
        tmp_path / "movies.dat",
        "1::Seven (Se7en) (1995)::Crime\n"
        "2::unknown::Drama\n"
        "3::Heat (19xx)::Action\n"
        "4::City of Lost Children, The (Cité des enfants perdus, La)::Adventure\n"
        "5::Kolya (1996)::Comedy\n",
        encoding="latin-1",
    )
    ds, warned = load_logged(f"ml-1m:{tmp_path}", caplog)
    check_contract(ds)
    assert ds.items["year"].fillna(0.0).tolist() == [1995.0, 0.0, 0.0, 0.0, 1996.0]
    assert warned == [not_numbers(tmp_path / "movies.dat", "year", 3, 2)]


def test_ml_1m_as_an_editor_may_save_it(tmp_path: Path) -> None:
    """A UTF-8 byte-order mark (read as latin-1 it became part of the first id, "ï»¿1": user
    1's ratings moved to a user without attributes), spaces around ids, and CR line ends."""
    ml_1m_fixture(tmp_path)
    for name in ("users.dat", "movies.dat", "ratings.dat"):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r"))
    ratings = tmp_path / "ratings.dat"
    ratings.write_bytes(ratings.read_bytes().replace(b"2::9::", b" 2 :: 9 ::"))
    ds = load_dataset(f"ml-1m:{tmp_path}")
    assert sorted(ds.users.index) == ["1", "2"] and sorted(ds.items.index) == ["1", "2", "3", "9"]
    assert ds.users.loc["1", "gender"] == "F" and ds.items.loc["1", "year"] == 1995.0
    assert sorted(ds.interactions["user_id"]) == ["1", "1", "2", "2"]
    ratings.write_bytes(b"1::1::5::978300760\n :: 2::5::978300760\n")
    with pytest.raises(DataError, match=r"ratings.dat: line 2: empty 'user_id'"):
        load_dataset(f"ml-1m:{tmp_path}")


def test_ml_1m_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing file: .*ratings\.dat"):
        load_dataset(f"ml-1m:{tmp_path}")
    ml_1m_fixture(tmp_path)
    (tmp_path / "users.dat").unlink()
    ds = load_dataset(f"ml-1m:{tmp_path}")
    check_contract(ds)
    assert ds.user_columns == () and ds.users.shape == (2, 0)


@pytest.mark.skipif(not ML_1M_HALF.is_dir(), reason=f"ML-1M (users 1-2999) not at {ML_1M_HALF}")
def test_ml_1m_half_real_data(caplog: pytest.LogCaptureFixture) -> None:
    ds, warned = load_logged(f"ml-1m:{ML_1M_HALF}", caplog)
    check_contract(ds)
    assert warned == []
    assert ds.summary()["n_interactions"] == 487_650
    assert len(ds.users) == 2999 and len(ds.items) == 3883
    assert not ds.users.isna().any().any()
    assert ds.items["year"].between(1919, 2000).all()


# --- MovieLens-100K -----------------------------------------------------------------------


def test_ml_100k_grouplens(tmp_path: Path) -> None:
    write(tmp_path / "u.data", "1\t10\t3\t881250949\n2\t20\t4\t881250000\n1\t30\t4\t881251000\n")
    write(tmp_path / "u.user", "1|24|M|technician|85711\n2|53|F|other|T8H1N\n")
    flags = ["0"] * 19
    comedy = flags.copy()
    comedy[5] = "1"
    write(
        tmp_path / "u.item",
        f"10|Toy Story (1995)|01-Jan-1995||http://x|{'|'.join(comedy)}\n"
        f"20|Señor (1990)|||http://y|{'|'.join(flags)}\n",
        encoding="latin-1",
    )
    ds = load_dataset(f"ml-100k:{tmp_path}")
    check_contract(ds)
    assert ds.interactions["item_id"].tolist() == ["20", "10", "30"]
    assert ds.users["age"].tolist() == ["18", "50"]
    assert ds.users.loc["2", "zip3"] == "T8H"
    assert ds.items.loc["10", "genres"] == "Comedy"
    assert ds.items["year"].tolist()[:2] == [1995.0, 1990.0]
    assert ds.items["genres"].isna().tolist() == [False, True, True]

    write(tmp_path / "u.genre", "\n".join(f"g{i}|{i}" for i in range(19)) + "\n\n")
    assert load_dataset(f"ml-100k:{tmp_path}").items.loc["10", "genres"] == "g5"


def ml_100k_fixture(directory: Path, data: str | None = None) -> Path:
    """GroupLens files with the cells the real ones hold: an item with an empty date and the
    title "unknown" (u.item 267), ages and dates that are not numbers, a title fragment."""
    default = "".join(f"{u}\t{i}0\t3\t88125094{i}\n" for u in (1, 2, 3) for i in range(1, 6))
    write(directory / "u.data", default if data is None else data)
    write(directory / "u.user", "1|unknown|M|technician|85711\n2||F|other|T8H1N\n3|24|M|x|1\n")
    flags = "|".join(["0"] * 19)
    write(
        directory / "u.item",
        f"10|Toy Story (1995)|01-Jan-1995||http://x|{flags[:-1]}1\n"
        f"20|unknown||||{flags}\n"
        f"30|Heat|unknown||http://y|{flags}\n"
        f"40|Good, the Bad|and the Ugly||http://z|{flags}\n"
        f"50|Kolya (1996)|soon||http://k|{flags}\n",
        encoding="latin-1",
    )
    return directory


def test_ml_100k_grouplens_cells_that_are_not_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds, warned = load_logged(f"ml-100k:{ml_100k_fixture(tmp_path)}", caplog)
    check_contract(ds)
    assert ds.users["age"].fillna("-").tolist() == ["-", "-", "18"]
    assert ds.users.loc["1", "zip3"] == "857" and ds.users.loc["2", "zip3"] == "T8H"
    assert ds.items["year"].fillna(0.0).tolist() == [1995.0, 0.0, 0.0, 0.0, 1996.0]
    assert warned == [
        not_numbers(tmp_path / "u.user", "age", 2, 1),
        not_numbers(tmp_path / "u.item", "year", 3, 2),
    ]


def recbole_fixture(directory: Path, inter: str | None = None) -> Path:
    """RecBole atomic files whose `release_year` holds what its converter leaves there: an
    empty cell, "unknown", and the alternate title it cut at the first "(" (RecSysDatasets#131)."""
    write(
        directory / f"{directory.name}.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + ("196\t242\t3\t881250949\n186\t267\t3\t891717742\n" if inter is None else inter),
    )
    write(
        directory / f"{directory.name}.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "242\tKolya\t1996\tComedy\n"
        "267\tunknown\t\tunknown\n"
        "1300\tCity of Lost Children, The\tCité des enfants perdus, La\tAdventure\n"
        "1301\tX\tunknown\tDrama\n",
        encoding="latin-1",
    )
    write(
        directory / f"{directory.name}.user",
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "196\t49\tM\twriter\t55105\n186\tunknown\tF\texecutive\t00000\n",
    )
    return directory


@pytest.mark.parametrize(
    ("scheme", "ages"),
    [("ml-100k", ["45", "-"]), ("ml-1m", ["49", "unknown"])],  # ML-1M ages are group codes
)
def test_recbole_cells_that_are_not_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, scheme: str, ages: list[str]
) -> None:
    directory = tmp_path / scheme
    directory.mkdir()
    ds, warned = load_logged(f"{scheme}:{recbole_fixture(directory)}", caplog)
    check_contract(ds)
    assert ds.users["age"].fillna("-").tolist() == ages
    assert ds.items["year"].fillna(0.0).tolist() == [1996.0, 0.0, 0.0, 0.0]
    item_warning = not_numbers(directory / f"{scheme}.item", "release_year", 3, 3)
    if scheme == "ml-100k":
        assert warned == [not_numbers(directory / "ml-100k.user", "age", 1, 3), item_warning]
    else:
        assert warned == [item_warning]


@pytest.mark.parametrize(
    ("layout", "data", "message"),
    [
        ("grouplens", "1\t10\t3\t881250949\n1\t20\t4\n", r"u.data: line 2: expected 4 fields"),
        ("grouplens", "1\t10\t3\t881250949\n1\t20\t4\tunknown\n",
         r"u.data: line 2: 'timestamp' is not a 64-bit integer: 'unknown'"),
        ("grouplens", "1\t10\t3\t881250949\n\t20\t4\t881250949\n",
         r"u.data: line 2: empty 'user_id'"),
        ("grouplens", "1\t10\t3\t881250949\n1\t20\tfour\t881250949\n",
         r"u.data: line 2: 'rating' is not a 64-bit integer: 'four'"),
        ("recbole", "196\t242\t3\t881250949\n186\t267\t3\tsoon\n",
         r"ml-100k.inter: line 3: 'timestamp' is not a 64-bit integer: 'soon'"),
        ("recbole", "196\t242\t3\n", r"ml-100k.inter: line 2: expected 4 fields, found 3"),
    ],
)  # fmt: skip
def test_ml_100k_malformed_interaction_rows(
    tmp_path: Path, layout: str, data: str, message: str
) -> None:
    """Unlike an attribute cell, a malformed rating cannot be read as missing: it fails."""
    directory = tmp_path / "ml-100k"
    directory.mkdir()
    if layout == "grouplens":
        ml_100k_fixture(directory, data)
    else:
        recbole_fixture(directory, data)
    with pytest.raises(DataError, match=message):
        load_dataset(f"ml-100k:{directory}")


def test_ml_100k_recbole_atomic(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "ml-100k"
    directory.mkdir()
    write(
        directory / "ml-100k.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "196\t242\t3\t881250949\n186\t302\t3\t891717742.0\n",
    )
    write(
        directory / "ml-100k.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        '242\tKolya "Kolja"\t1996\tComedy\n302\tL.A. Confidential\t\tCrime Film-Noir Mystery\n',
    )
    write(
        directory / "ml-100k.user",
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "196\t49\tM\twriter\t55105\n",
    )
    ds, warned = load_logged(f"ml-100k:{directory}", caplog)
    check_contract(ds)
    assert warned == [not_numbers(directory / "ml-100k.item", "release_year", 1, 3)]
    assert ds.interactions["timestamp"].tolist() == [881250949, 891717742]
    assert ds.items.loc["302", "genres"] == "Crime|Film-Noir|Mystery"
    assert ds.items["year"].isna().tolist() == [False, True]
    assert ds.users.loc["196", "age"] == "45"
    assert ds.users.loc["186"].isna().all()


def test_ml_1m_recbole_atomic(tmp_path: Path) -> None:
    write(tmp_path / "ml-1m.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t5\t9\n")
    write(
        tmp_path / "ml-1m.user",
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t25\tF\t3\t02139\n",
    )
    write(
        tmp_path / "ml-1m.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tgenre:token_seq\n"
        "5\tX\t1999\tAction Drama\n",
    )
    ds = load_dataset(f"ml-1m:{tmp_path}")
    check_contract(ds)
    assert ds.users.loc["1", "age"] == "25" and ds.users.loc["1", "zip3"] == "021"
    assert ds.items.loc["5", "genres"] == "Action|Drama"


def test_ml_100k_without_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"neither GroupLens"):
        load_dataset(f"ml-100k:{tmp_path}")


# --- csv ----------------------------------------------------------------------------------

SCHEMA = {
    "interactions": {"file": "inter.csv", "user_id": "user", "item_id": "item", "timestamp": "ts"},
    "users": {"file": "users.csv", "id": "user", "columns": {"age": {"kind": "numeric"}}},
    "items": {
        "file": "items.tsv",
        "id": "item",
        "separator": "\t",
        "columns": {
            "genres": {"kind": "multi_hot", "separator": "|"},
            "brand": {"kind": "categorical"},
            "price": {"kind": "numeric", "transform": "log"},
        },
    },
}


def csv_fixture(directory: Path, schema: dict[str, object], inter: str | None = None) -> Path:
    write(directory / "schema.json", json.dumps(schema))
    default = "user,item,ts,rating\nu1,i1,1041379200,5\nu2,i2,1041379100,3\n u1 ,i3,1041379300,1\n"
    write(directory / "inter.csv", default if inter is None else inter)
    write(directory / "users.csv", 'user,age,city\nu1,31,"Paris, FR"\nu9,,x\n')
    write(directory / "items.tsv", "item\tgenres\tbrand\tprice\ni1\ta|b\tacme\t9.5\ni4\t\t\t\n")
    return directory


def test_csv(tmp_path: Path) -> None:
    ds = load_dataset(f"csv:{csv_fixture(tmp_path, SCHEMA)}")
    check_contract(ds)
    assert ds.interactions["user_id"].tolist() == ["u2", "u1", "u1"]
    assert ds.users.index.tolist() == ["u1", "u2"]
    assert ds.users["age"].fillna(-1.0).tolist() == [31.0, -1.0]
    assert ds.cold_users is not None and ds.cold_users.index.tolist() == ["u9"]
    assert ds.cold_users.columns.tolist() == ["age"] and ds.cold_users["age"].isna().all()
    assert ds.items.index.tolist() == ["i1", "i4", "i2", "i3"]
    assert list(ds.items.loc["i1"]) == ["a|b", "acme", 9.5]
    assert ds.items.loc["i4"].isna().to_numpy().all()
    assert [c.name for c in ds.item_columns] == ["genres", "brand", "price"]
    assert ds.item_columns[2].transform == "log"


def test_csv_iso_timestamps_and_minimal_schema(tmp_path: Path) -> None:
    inter = "user_id,item_id,timestamp\na,x,2003-01-01T00:00:00Z\nb,y,2003-01-01T02:00:00+01:00\n"
    ds = load_dataset(
        f"csv:{csv_fixture(tmp_path, {'interactions': {'file': 'inter.csv'}}, inter)}"
    )
    check_contract(ds)
    assert ds.interactions["timestamp"].tolist() == [SPLIT_2003, SPLIT_2003 + 3600]
    assert ds.users.shape == (2, 0) and ds.items.shape == (2, 0)


@pytest.mark.parametrize(
    ("change", "inter", "message"),
    [
        ({"extra": {}}, None, r"schema.json: unknown key\(s\) \['extra'\]"),
        ({"interactions": {"file": "nope.csv"}}, None, r"missing file: .*nope\.csv"),
        ({"interactions": {"file": "inter.csv"}}, None, r"inter.csv: no column 'user_id'"),
        ({"users": {"file": "users.csv", "id": "user", "columns": {"height": {"kind": "numeric"}}}},
         None, r"users.csv: no column 'height'"),
        ({"users": {"file": "users.csv", "id": "user", "columns": {"age": {"kind": "float"}}}},
         None, r"users.columns.age: 'kind' must be one of"),
        ({"users": {"file": "users.csv", "id": "user", "columns": {"city": {"kind": "numeric"}}}},
         None, r"users.csv: line 2: 'city' is not a finite number: 'Paris, FR'"),
        ({}, "user,item,ts\nu1,i1,100\nu1,i2,1.5\n", r"line 3: 'ts' is not a 64-bit integer"),
        ({}, "user,item,ts\nu1,i1,100\nu1,i2\n", r"inter.csv: line 3: expected 3 fields, found 2"),
        ({}, 'user,item,ts\n"u1",i1,100\nu1,i2,1,2\n', r"inter.csv: line 3: expected 3 fields"),
        ({}, "user,item,ts\nu1,i1,2003-01-01\nu1,,2003-01-02\n", r"line 3: empty 'item'"),
        ({}, "user,item,ts\nu1,i1,2003-01-01\nu1,i2,later\n", r"line 3: 'ts' is not an ISO-8601"),
        ({}, "user,item,ts\nu1,i1,100\nu1,i2,1e30\n", r"line 3: 'ts' is not a 64-bit integer"),
        # A carriage return alone ends a line, in the row check as in the parser (it split
        # the row silently, or failed later with an IndexError).
        ({}, "user,item,ts\nu1,i1,100\nu1,i\r2,100\n", r"inter.csv: line 3: expected 3 fields"),
        # A row is named by the line it starts on.
        ({}, 'user,item,ts\nu1,"i1,100\nu2,i2,3\n',
         r"line 2: expected 3 fields, found 2 \(the row runs to line 3: an unclosed quote\?\)"),
    ],
)  # fmt: skip
def test_csv_errors(
    tmp_path: Path, change: dict[str, object], inter: str | None, message: str
) -> None:
    csv_fixture(tmp_path, {**SCHEMA, **change}, inter)
    with pytest.raises(DataError, match=message):
        load_dataset(f"csv:{tmp_path}")


def test_csv_iso_times_outside_the_nanosecond_range(tmp_path: Path) -> None:
    """pandas holds nanoseconds for the years 1677-2262 only; the times are seconds."""
    csv_fixture(tmp_path, SCHEMA, "user,item,ts\nu1,i1,2003-01-01\nu1,i2,1000-01-01\n")
    times = load_dataset(f"csv:{tmp_path}").interactions["timestamp"]
    assert sorted(times) == [-30_610_224_000, 1_041_379_200]


def test_csv_missing_or_invalid_schema(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing file: .*schema\.json"):
        load_dataset(f"csv:{tmp_path}")
    write(tmp_path / "schema.json", '{"interactions": ')
    with pytest.raises(DataError, match=r"schema.json: invalid JSON at line 1"):
        load_dataset(f"csv:{tmp_path}")
    (tmp_path / "schema.json").write_bytes(b'{"interactions": "\xff"}')
    with pytest.raises(DataError, match=r"schema.json: not UTF-8 text"):
        load_dataset(f"csv:{tmp_path}")


def test_csv_repeated_attribute_id(tmp_path: Path) -> None:
    csv_fixture(tmp_path, SCHEMA)
    write(tmp_path / "users.csv", "user,age\nu1,3\nu1,4\n")
    with pytest.raises(DataError, match=r"users.csv: line 3: repeated user_id 'u1'"):
        load_dataset(f"csv:{tmp_path}")


def test_csv_files_as_editors_and_old_systems_write_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Old Mac line ends (CR alone), lines of spaces, a byte-order mark in schema.json, a
    quoted field over the csv module's 128 KiB limit, numbers that are not finite, and times
    in milliseconds (read as seconds, with a warning)."""
    columns = {"age": {"kind": "numeric"}, "bio": {"kind": "categorical"}}
    schema = {
        "interactions": {"file": "inter.csv"},
        "users": {"file": "users.csv", "id": "user", "columns": columns},
    }
    (tmp_path / "schema.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(schema).encode())
    write(tmp_path / "inter.csv", "user_id,item_id,timestamp\ru1,i1,5\r  \r\tu2,i2,6\r")
    long_bio = "x" * 200_000
    write(tmp_path / "users.csv", f'user,age,bio\nu1,31,"{long_bio}"\n   \nu2,,b\n')
    ds, warned = load_logged(f"csv:{tmp_path}", caplog)
    assert warned == []
    assert ds.interactions.to_dict("list") == {
        "user_id": ["u1", "u2"], "item_id": ["i1", "i2"], "timestamp": [5, 6]
    }  # fmt: skip
    assert ds.users.loc["u1", "bio"] == long_bio and ds.users["age"].isna().tolist() == [
        False, True
    ]  # fmt: skip
    write(tmp_path / "users.csv", "user,age,bio\nu1,inf,a\n")
    with pytest.raises(DataError, match=r"users.csv: line 2: 'age' is not a finite number: 'inf'"):
        load_dataset(f"csv:{tmp_path}")
    # A one-column file's line of spaces is blank, so the repeat is named at its own line.
    users = {"file": "users.csv", "id": "user"}
    (tmp_path / "schema.json").write_text(json.dumps(schema | {"users": users}))
    write(tmp_path / "users.csv", "user\nu1\n   \nu1\n")
    with pytest.raises(DataError, match=r"users.csv: line 4: repeated user_id 'u1'"):
        load_dataset(f"csv:{tmp_path}")
    write(tmp_path / "users.csv", "user\nu1\n")
    write(tmp_path / "inter.csv", "user_id,item_id,timestamp\nu1,i1,1041379200000\nu1,i2,5\n")
    ds, warned = load_logged(f"csv:{tmp_path}", caplog)
    assert ds.interactions["timestamp"].max() == 1_041_379_200_000
    assert warned == [
        f"{tmp_path / 'inter.csv'}: 1 of 2 'timestamp' values are past the year 5000 as Unix "
        "seconds: if they are milliseconds, divide them by 1000"
    ]


def test_csv_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    csv_fixture(tmp_path, {"interactions": {"file": "inter.csv"}})
    (tmp_path / "inter.csv").write_bytes(b"\xef\xbb\xbfuser_id,item_id,timestamp\r\nu1,i1,5\r\n")
    ds = load_dataset(f"csv:{tmp_path}")
    assert ds.interactions.to_dict("list") == {
        "user_id": ["u1"],
        "item_id": ["i1"],
        "timestamp": [5],
    }


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-32"])
def test_csv_in_encodings_that_are_not_ascii_compatible(tmp_path: Path, encoding: str) -> None:
    # Their separators and newlines are not single ASCII bytes (and utf-8-sig's codec writes
    # a byte-order mark): every row read "expected 3 fields, found 1".
    spec = {"file": "inter.csv", "encoding": encoding}
    csv_fixture(tmp_path, {"interactions": spec})
    text = "user_id,item_id,timestamp\r\nu\u00e9,i\u4e00,5\r\nu2,i1,6\r\n"
    (tmp_path / "inter.csv").write_bytes(text.encode(encoding))
    ds = load_dataset(f"csv:{tmp_path}")
    assert ds.interactions.to_dict("list") == {
        "user_id": ["u\u00e9", "u2"],
        "item_id": ["i\u4e00", "i1"],
        "timestamp": [5, 6],
    }
    (tmp_path / "inter.csv").write_bytes((text + "u3,i2\r\n").encode(encoding))
    with pytest.raises(DataError, match=r"inter\.csv: line 4: expected 3 fields, found 2"):
        load_dataset(f"csv:{tmp_path}")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"user_id,item_id,timestamp\n", r"no interactions"),
        (b"", r"inter.csv: empty file, expected a header line"),  # "empty column names: ['']"
        (b"\r\n\n", r"inter.csv: empty file, expected a header line"),
        (b"user_id,item_id,timestamp\nu\xe9,i1,5\n", r"inter.csv: cannot decode as 'utf-8'"),
    ],
)
def test_csv_empty_or_undecodable(tmp_path: Path, content: bytes, message: str) -> None:
    csv_fixture(tmp_path, {"interactions": {"file": "inter.csv"}})
    (tmp_path / "inter.csv").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_dataset(f"csv:{tmp_path}")

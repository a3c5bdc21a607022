"""MovieLens sources: `ml-1m:DIR` and `ml-100k:DIR` (GroupLens files or RecBole atomic files).

Every rating is one implicit interaction. All layouts produce the same feature set, so a
model configuration carries over between them:

- users: `gender`, `age` (the ML-1M age group: 1, 18, 25, 35, 45, 50, 56; ML-100K ages in
  years are mapped into the same groups), `occupation`, `zip1` / `zip3` (first one / three
  characters of the zip code), all categorical;
- items: `genres` (multi_hot, "|"), `year` (release year, numeric, bucketed).

`ml-1m:DIR` falls back to RecBole atomic files when DIR has no `ratings.dat`.

The files are read as published: a numeric attribute that cannot be read (an "unknown" age,
an empty release date, the piece of a title that RecBole's converter leaves in
`release_year`) is missing, and one warning per column says how many cells and the first
line. A malformed interaction row is an error naming file and line. `csv:` sources keep
their declared typing, where such a cell is an error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from models.dataset import ColumnSpec, DataError, Dataset
from models.sources._common import (
    Table,
    assemble,
    attribute_frame,
    categorical,
    read_delimited,
)

USER_COLUMNS = (
    ColumnSpec("gender", "categorical"),
    ColumnSpec("age", "categorical"),
    ColumnSpec("occupation", "categorical"),
    ColumnSpec("zip1", "categorical"),
    ColumnSpec("zip3", "categorical"),
)
ITEM_COLUMNS = (
    ColumnSpec("genres", "multi_hot", separator="|"),
    ColumnSpec("year", "numeric", transform="bucket"),
)
# The 19 flag columns of ML-100K's u.item, in file order, for when u.genre is absent.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
_AGE_GROUP_BOUNDS = np.array([18, 25, 35, 45, 50, 56])
_AGE_GROUPS = np.array(["1", "18", "25", "35", "45", "50", "56"], dtype=object)
_LATIN1 = "latin-1"

log = logging.getLogger(__name__)


def load_ml_1m(directory: Path, name: str) -> Dataset:
    """Load MovieLens-1M: `ratings.dat`, `users.dat`, `movies.dat` ("::"-separated).

    Args:
        directory: folder holding the files (or RecBole `*.inter` / `*.user` / `*.item`).
        name: the source string, recorded as `Dataset.name`.

    Raises:
        DataError: `ratings.dat` is missing, or a row has the wrong number of fields or a
            malformed rating; the message names file and line.
    """
    if not (directory / "ratings.dat").exists() and _find_atomic(directory, "inter"):
        return load_atomic(directory, name, age_in_years=False)
    fields = ["user_id", "item_id", "rating", "timestamp"]
    ratings = read_delimited(directory / "ratings.dat", "::", fields, encoding=_LATIN1)
    interactions = _interactions(ratings, "user_id", "item_id", "timestamp", rating="rating")
    users = items = None
    if (directory / "users.dat").exists():
        fields = ["user_id", "gender", "age", "occupation", "zip"]
        table = read_delimited(directory / "users.dat", "::", fields, encoding=_LATIN1)
        users = _users(table, "user_id", table.column("age"))
    if (directory / "movies.dat").exists():
        table = read_delimited(
            directory / "movies.dat", "::", ["item_id", "title", "genres"], encoding=_LATIN1
        )
        year = _report_missing(table, "year", _year_from_title(table.column("title")))
        items = _items(table, "item_id", categorical(table.column("genres")), year)
    return _dataset(name, interactions, users, items)


def load_ml_100k(directory: Path, name: str) -> Dataset:
    """Load MovieLens-100K from GroupLens files (`u.data`, `u.user`, `u.item`, `u.genre`) or,
    when `u.data` is absent, from RecBole atomic files (`*.inter`, `*.user`, `*.item`).

    Args:
        directory: folder holding the files.
        name: the source string, recorded as `Dataset.name`.

    Raises:
        DataError: no known layout, a missing file or a malformed row.
    """
    if not (directory / "u.data").exists():
        if _find_atomic(directory, "inter") is None:
            raise DataError(
                f"{directory}: neither GroupLens ML-100K files (u.data) "
                "nor RecBole atomic files (*.inter) found"
            )
        return load_atomic(directory, name, age_in_years=True)
    fields = ["user_id", "item_id", "rating", "timestamp"]
    interactions = _interactions(
        read_delimited(directory / "u.data", "\t", fields, encoding=_LATIN1),
        "user_id",
        "item_id",
        "timestamp",
        rating="rating",
    )
    users = items = None
    if (directory / "u.user").exists():
        fields = ["user_id", "age", "gender", "occupation", "zip"]
        table = read_delimited(directory / "u.user", "|", fields, encoding=_LATIN1)
        users = _users(table, "user_id", _age_group(table, "age"))
    if (directory / "u.item").exists():
        genres = _genre_names(directory / "u.genre")
        fields = ["item_id", "title", "release", "video_release", "url", *genres]
        table = read_delimited(directory / "u.item", "|", fields, encoding=_LATIN1)
        flags = table.frame[list(genres)].to_numpy() == "1"
        names = np.array(genres, dtype=object)
        joined = ["|".join(names[row]) for row in flags]
        year = _year_from_release(table.column("release"), table.column("title"))
        year = _report_missing(table, "year", year)
        items = _items(table, "item_id", categorical(pd.Series(joined, dtype="str")), year)
    return _dataset(name, interactions, users, items)


def load_atomic(directory: Path, name: str, *, age_in_years: bool) -> Dataset:
    """Load RecBole atomic files: tab-separated, header fields typed as `name:type`.

    Args:
        directory: folder holding one `*.inter` and optionally one `*.user` / `*.item`.
        name: the source string.
        age_in_years: `age` holds years (ML-100K) rather than ML-1M age-group codes.
    """
    inter_path = _find_atomic(directory, "inter")
    if inter_path is None:
        raise DataError(f"{directory}: no RecBole *.inter file")
    table = _atomic_table(inter_path)
    interactions = _interactions(table, "user_id", "item_id", "timestamp")
    users = items = None
    user_path = _find_atomic(directory, "user")
    if user_path is not None:
        table = _atomic_table(user_path)
        age = _age_group(table, "age") if age_in_years else table.column("age")
        users = _users(table.rename({"zip_code": "zip"}), "user_id", age)
    item_path = _find_atomic(directory, "item")
    if item_path is not None:
        table = _atomic_table(item_path)
        genre_column = "class" if "class" in table.frame.columns else "genre"
        genres = categorical(table.column(genre_column)).str.split().str.join("|")
        items = _items(table, "item_id", genres, _numbers(table, "release_year"))
    return _dataset(name, interactions, users, items)


def _dataset(
    name: str, interactions: pd.DataFrame, users: pd.DataFrame | None, items: pd.DataFrame | None
) -> Dataset:
    user_columns = USER_COLUMNS if users is not None else ()
    item_columns = ITEM_COLUMNS if items is not None else ()
    return assemble(name, interactions, users, items, user_columns, item_columns)


def _interactions(
    table: Table, user: str, item: str, timestamp: str, rating: str | None = None
) -> pd.DataFrame:
    """The interactions; a `rating` column, unused (every rating is an interaction), is
    still checked: a row whose rating is not an integer is malformed."""
    if rating is not None:
        table.integers(rating)
    return pd.DataFrame(
        {
            "user_id": table.ids(user),
            "item_id": table.ids(item),
            "timestamp": table.integers(timestamp),
        }
    )


def _users(table: Table, id_column: str, age: pd.Series) -> pd.DataFrame:
    zip_code = categorical(table.column("zip"))
    columns: dict[str, object] = {
        "gender": categorical(table.column("gender")).to_numpy(),
        "age": categorical(age).to_numpy(),
        "occupation": categorical(table.column("occupation")).to_numpy(),
        "zip1": zip_code.str.slice(0, 1).to_numpy(),
        "zip3": zip_code.str.slice(0, 3).to_numpy(),
    }
    return attribute_frame(table.ids(id_column), table, columns, "user_id")


def _items(table: Table, id_column: str, genres: pd.Series, year: pd.Series) -> pd.DataFrame:
    columns: dict[str, object] = {
        "genres": genres.to_numpy(),
        "year": year.to_numpy(dtype=np.float64),
    }
    return attribute_frame(table.ids(id_column), table, columns, "item_id")


def _age_group(table: Table, column: str) -> pd.Series:
    """Ages in years mapped to ML-1M age-group codes; an age that is not a number is missing."""
    years = _numbers(table, column).to_numpy()
    groups = pd.Series(_AGE_GROUPS[np.searchsorted(_AGE_GROUP_BOUNDS, years, side="right")])
    return groups.mask(np.isnan(years)).astype("str")


def _numbers(table: Table, column: str) -> pd.Series:
    """Column `column` as float64, a cell that is not a finite number read as missing.

    Unlike `Table.floats` (csv: declared typing) this does not fail: the public files hold
    such cells, and one unreadable attribute should not refuse a whole data set.
    """
    numbers = pd.to_numeric(table.column(column).str.strip(), errors="coerce")
    numbers = numbers.astype("float64")
    return _report_missing(table, column, numbers.where(np.isfinite(numbers)))


def _report_missing(table: Table, column: str, values: pd.Series) -> pd.Series:
    """`values` (one per row of `table`), after one warning counting those that are missing.

    One warning per column, not per cell: the real files would otherwise bury the log.
    """
    missing = values.isna().to_numpy()
    if missing.any():
        count = int(missing.sum())
        cells = "cell is not a number" if count == 1 else "cells are not numbers"
        first = int(table.lines[int(np.argmax(missing))])
        where = f"{table.path}: {column!r}"
        log.warning("%s: %d %s (first at line %d); read as missing", where, count, cells, first)
    return values


def _year_from_title(titles: pd.Series) -> pd.Series:
    return pd.to_numeric(titles.str.extract(r"\((\d{4})\)\s*$", expand=False)).astype("float64")


def _year_from_release(release: pd.Series, titles: pd.Series) -> pd.Series:
    """ML-100K release dates look like "01-Jan-1995"; the title's "(1995)" fills gaps."""
    from_date = pd.to_numeric(release.str.extract(r"(\d{4})\s*$", expand=False))
    return from_date.astype("float64").fillna(_year_from_title(titles))


def _genre_names(path: Path) -> tuple[str, ...]:
    if not path.exists():
        return ML100K_GENRES
    table = read_delimited(path, "|", ["name", "index"], encoding=_LATIN1)
    order = table.integers("index")
    names = table.ids("name").to_numpy()
    if sorted(order.tolist()) != list(range(len(order))):
        raise DataError(f"{path}: genre indices must be 0..{len(order) - 1}")
    return tuple(str(n) for n in names[np.argsort(order)])


def _find_atomic(directory: Path, suffix: str) -> Path | None:
    preferred = directory / f"{directory.name}.{suffix}"
    if preferred.is_file():
        return preferred
    found = sorted(directory.glob(f"*.{suffix}"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DataError(f"{directory}: several RecBole *.{suffix} files ({names}); keep one")
    return found[0] if found else None


def _atomic_table(path: Path) -> Table:
    table = read_delimited(path, "\t", encoding=_LATIN1)
    return table.rename({c: c.split(":")[0] for c in table.frame.columns})

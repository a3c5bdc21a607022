"""`ItemAttributes`: the catalogue's raw item attribute values, by catalogue row, columnar.

The service filters recalls by these values (`app.filters`), so the bundle carries them as
`item_attributes.npz` (docs/design.md). They are the raw values of the item table, not the
model's encoded features: a filter names a category or a tag as the catalogue spells it,
including values the model's vocabulary dropped as rare.

- categorical: the sorted distinct values (`dictionary`) and one int32 code per row (-1:
  missing);
- multi_hot: a dictionary and CSR rows: the codes of row r are `codes[offsets[r]:offsets[r+1]]`;
- numeric: float64 per row, NaN where missing.

numpy and the standard library only: the service's workers load it and never import pandas
(`from_frame`, which the exporter calls, reads a DataFrame through its own methods). Saved
as one `.npz` of plain arrays (no pickle); the column list is a JSON string inside it.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.feature_spec import ColumnKind, as_float, is_missing, split_multi

if TYPE_CHECKING:
    import pandas as pd

    from models.dataset import ColumnSpec

_META = "meta"


@dataclass(frozen=True, eq=False)
class AttributeColumn:
    """One attribute of every catalogue row.

    Attributes:
        name: the item table's column name.
        kind: categorical | multi_hot | numeric.
        dictionary: sorted distinct values (categorical, multi_hot; empty for numeric).
        codes: int32 indices into `dictionary`: one per row (categorical, -1 missing), or the
            CSR values (multi_hot).
        offsets: int64 `(n_items + 1,)` CSR row starts (multi_hot only; else empty).
        numbers: float64 `(n_items,)` (numeric only; else empty), NaN missing.
        separator: how a multi_hot raw string joins its values.
    """

    name: str
    kind: ColumnKind
    dictionary: np.ndarray
    codes: np.ndarray
    offsets: np.ndarray
    numbers: np.ndarray
    separator: str = "|"

    def lookup(self, values: Iterable[str]) -> tuple[np.ndarray, list[str]]:
        """(codes of `values` found in the dictionary, the values that are not)."""
        values = list(values)
        where = np.searchsorted(self.dictionary, np.array(values, dtype=np.str_))
        where = np.minimum(where, max(len(self.dictionary) - 1, 0))
        found = [
            len(self.dictionary) > 0 and self.dictionary[w] == v
            for w, v in zip(where.tolist(), values, strict=True)
        ]
        unknown = [v for v, ok in zip(values, found, strict=True) if not ok]
        return where[np.array(found, dtype=bool)].astype(np.int32), unknown

    def rows_with_any(self, codes: np.ndarray) -> np.ndarray:
        """Bool `(n_items,)`: rows whose value (categorical) or one of whose values
        (multi_hot) is among `codes`."""
        wanted = np.zeros(len(self.dictionary) + 1, dtype=bool)  # last slot: missing (-1)
        wanted[codes] = True
        hit = wanted[self.codes]
        if self.kind == "categorical":
            return hit
        # Hits per row as differences of a running count: exact for empty rows too.
        running = np.concatenate([[0], np.cumsum(hit, dtype=np.int64)])
        return running[self.offsets[1:]] > running[self.offsets[:-1]]

    def raw_values(self, value: Any) -> list[str]:
        """A raw categorical or multi_hot value (as an item table or a request holds it) as
        its values."""
        if self.kind == "multi_hot":
            return split_multi(value, self.separator)
        return [] if is_missing(value) else [str(value)]


@dataclass(frozen=True, eq=False)
class ItemAttributes:
    """Raw attribute values of the catalogue's `n_items` rows, by column name."""

    n_items: int
    columns: Mapping[str, AttributeColumn]

    @classmethod
    def from_frame(
        cls, items: pd.DataFrame, specs: Sequence[ColumnSpec], item_ids: Sequence[str]
    ) -> ItemAttributes:
        """The columns `specs` of `items` (indexed by item id: `Dataset.items`), in the row
        order of `item_ids` (the bundle's)."""
        table = items.reindex(list(item_ids))
        columns = {}
        for spec in specs:
            values = table[spec.name].to_numpy(dtype=object)
            if spec.kind == "numeric":
                columns[spec.name] = _numeric(spec.name, values)
            elif spec.kind == "categorical":
                columns[spec.name] = _categorical(spec.name, values)
            else:
                columns[spec.name] = _multi_hot(spec.name, values, spec.separator)
        return cls(len(item_ids), columns)

    def save(self, path: Path) -> None:
        """One `.npz` of plain arrays at `path` (a file object or name ending in .npz)."""
        meta = {"n_items": self.n_items, "columns": []}
        arrays: dict[str, np.ndarray] = {}
        for i, column in enumerate(self.columns.values()):
            meta["columns"].append(  # type: ignore[attr-defined]
                {"name": column.name, "kind": column.kind, "separator": column.separator}
            )
            for part in ("dictionary", "codes", "offsets", "numbers"):
                arrays[f"{i}.{part}"] = getattr(column, part)
        arrays[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with path.open("wb") as f:
            np.savez(f, allow_pickle=False, **arrays)

    @classmethod
    def load(cls, path: Path) -> ItemAttributes:
        """Read a file `save` wrote.

        Raises:
            OSError: the file cannot be read.
            ValueError: not such a file, or its arrays disagree with its column list.
        """
        try:
            return cls._load(path)
        except (KeyError, TypeError, zipfile.BadZipFile) as exc:  # what a foreign file raises
            raise ValueError(f"not an item attributes file: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def _load(cls, path: Path) -> ItemAttributes:
        # Opened here: numpy leaves its own file open when the archive is not a zip file.
        with path.open("rb") as file, np.load(file, allow_pickle=False) as data:
            meta = json.loads(data[_META].tobytes())
            n_items = int(meta["n_items"])
            columns = {}
            for i, entry in enumerate(meta["columns"]):
                parts = {p: data[f"{i}.{p}"] for p in ("dictionary", "codes", "offsets", "numbers")}
                column = AttributeColumn(
                    entry["name"], entry["kind"], **parts, separator=entry["separator"]
                )
                _check(column, n_items)
                columns[column.name] = column
        return cls(n_items, columns)


def _empty(dtype: type) -> np.ndarray:
    return np.zeros(0, dtype=dtype)


def _numeric(name: str, values: np.ndarray) -> AttributeColumn:
    numbers = np.array([as_float(v) for v in values], dtype=np.float64)
    numbers[~np.isfinite(numbers)] = math.nan
    return AttributeColumn(
        name, "numeric", _empty(np.str_), _empty(np.int32), _empty(np.int64), numbers
    )


def _categorical(name: str, values: np.ndarray) -> AttributeColumn:
    present = np.array([not is_missing(v) for v in values], dtype=bool)
    strings = np.array([str(v) for v in values[present]], dtype=np.str_)
    dictionary, inverse = np.unique(strings, return_inverse=True)
    codes = np.full(len(values), -1, dtype=np.int32)
    codes[present] = inverse
    return AttributeColumn(
        name, "categorical", dictionary, codes, _empty(np.int64), _empty(np.float64)
    )


def _multi_hot(name: str, values: np.ndarray, separator: str) -> AttributeColumn:
    """CSR over the distinct raw values first (tag strings repeat across many items), then
    expanded to rows by index arithmetic."""
    keys = [v if isinstance(v, str) else separator.join(split_multi(v, separator)) for v in values]
    distinct, inverse = np.unique(np.array(keys, dtype=np.str_), return_inverse=True)
    split = [sorted(set(split_multi(str(d), separator))) for d in distinct.tolist()]
    dictionary = np.array(sorted({v for vs in split for v in vs}), dtype=np.str_)
    position = {v: i for i, v in enumerate(dictionary.tolist())}
    lengths = np.array([len(vs) for vs in split], dtype=np.int64)
    flat = np.array([position[v] for vs in split for v in vs], dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    row_lengths = lengths[inverse]
    offsets = np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64)
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], row_lengths)
    codes = flat[np.repeat(starts[:-1][inverse], row_lengths) + within]
    return AttributeColumn(
        name,
        "multi_hot",
        dictionary,
        codes.astype(np.int32),
        offsets,
        _empty(np.float64),
        separator,
    )


def _check(column: AttributeColumn, n_items: int) -> None:
    """Shapes and code ranges that every mask over the column relies on."""
    size = len(column.dictionary)
    if column.kind == "numeric":
        ok = column.numbers.shape == (n_items,) and column.numbers.dtype == np.float64
    elif column.kind == "categorical":
        ok = column.codes.shape == (n_items,)
    elif column.kind == "multi_hot":
        offsets = column.offsets
        ok = (
            offsets.shape == (n_items + 1,)
            and (n_items == 0 or (offsets[0] == 0 and offsets[-1] == len(column.codes)))
            and bool(np.all(np.diff(offsets) >= 0))
        )
    else:
        raise ValueError(f"attribute {column.name!r}: unknown kind {column.kind!r}")
    if column.kind != "numeric":
        ok = ok and column.codes.dtype == np.int32 and column.dictionary.dtype.kind == "U"
        ok = ok and bool(np.all((column.codes >= -1) & (column.codes < size)))
        ok = ok and bool(np.all(column.dictionary[1:] > column.dictionary[:-1]))
    if not ok:
        raise ValueError(f"attribute {column.name!r}: arrays inconsistent with {n_items} items")

"""`csv:DIR` source: delimited files described by `DIR/schema.json`.

Schema (only `interactions` is required; paths are relative to DIR)::

    {
      "interactions": {"file": "interactions.csv",
                       "user_id": "user", "item_id": "item", "timestamp": "ts"},
      "users": {"file": "users.csv", "id": "user",
                "columns": {"age": {"kind": "numeric", "transform": "bucket"},
                            "country": {"kind": "categorical"}}},
      "items": {"file": "items.csv", "id": "item",
                "columns": {"genres": {"kind": "multi_hot", "separator": "|"}}}
    }

- Every file has a header line. Optional keys of every table: `separator` (one character,
  default ","), `encoding` (default "utf-8"; a byte-order mark is skipped). Double-quoted
  fields are honoured.
- `interactions`: `user_id` / `item_id` / `timestamp` name the file's columns (defaults:
  "user_id", "item_id", "timestamp"). Timestamps are integer Unix seconds or ISO-8601 times
  (UTC unless they carry an offset); the first row decides which. Integer times past the
  year 5000 get a warning: milliseconds, likely. Other columns are ignored.
- `users` / `items`: `id` names the id column (default "user_id" / "item_id"); `columns`
  maps column names to `kind` (categorical | multi_hot | numeric) plus `transform`
  (numeric: standard | log | bucket, default standard) or `separator` (multi_hot, default
  "|"). Undeclared columns are ignored; empty fields are missing values; a numeric field
  that is not a finite number is an error.
- Ids are strings with surrounding spaces stripped. Unknown keys, missing files or columns
  and malformed rows are errors naming the file, column and line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np
import pandas as pd

from models.dataset import ColumnSpec, DataError, Dataset
from models.feature_spec import ColumnKind, NumericTransform
from models.sources._common import Table, assemble, attribute_frame, categorical, read_delimited

log = logging.getLogger(__name__)

# Unix seconds of 5000-01-01: integer times past it are milliseconds (or microseconds) read as
# seconds, most likely (a split's cut and a half-life in days would be a thousand times off).
_YEAR_5000 = 95_617_584_000

SCHEMA_FILE = "schema.json"
_TABLE_KEYS = {"file", "separator", "encoding"}
_INTERACTION_KEYS = _TABLE_KEYS | {"user_id", "item_id", "timestamp"}
_ATTRIBUTE_KEYS = _TABLE_KEYS | {"id", "columns"}
_KINDS = get_args(ColumnKind)
_TRANSFORMS = get_args(NumericTransform)
# In seconds, not nanoseconds: times are parsed at the unit they need, and subtracting a
# nanosecond epoch would cast them to nanoseconds, whose range ends at the years 1677-2262.
_EPOCH = pd.Timestamp(0, unit="s", tz="UTC")


def load_csv(directory: Path, name: str) -> Dataset:
    """Load the files that `directory/schema.json` describes.

    Args:
        directory: folder holding `schema.json` and the files it names.
        name: the source string, recorded as `Dataset.name`.

    Raises:
        DataError: bad schema, missing file or column, or a malformed row.
    """
    schema_path = directory / SCHEMA_FILE
    schema = _read_schema(schema_path)
    _check_keys(schema, {"interactions", "users", "items"}, str(schema_path))
    if "interactions" not in schema:
        raise DataError(f"{schema_path}: 'interactions' is required")
    spec = _section(schema, "interactions", _INTERACTION_KEYS, schema_path)
    table = _read_table(directory, spec, schema_path)
    interactions = pd.DataFrame(
        {
            "user_id": _ids(table, _text(spec, "user_id", "user_id", schema_path)),
            "item_id": _ids(table, _text(spec, "item_id", "item_id", schema_path)),
            "timestamp": _timestamps(table, _text(spec, "timestamp", "timestamp", schema_path)),
        }
    )
    users, user_columns = _attributes(directory, schema, "users", "user_id", schema_path)
    items, item_columns = _attributes(directory, schema, "items", "item_id", schema_path)
    return assemble(name, interactions, users, items, user_columns, item_columns)


def _read_schema(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"missing file: {path} (a csv source is described by {SCHEMA_FILE})")
    try:
        schema = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM or none
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text: {error}") from None
    if not isinstance(schema, dict):
        raise DataError(f"{path}: expected a JSON object")
    return schema


def _check_keys(section: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _section(
    schema: Mapping[str, Any], key: str, allowed: set[str], schema_path: Path
) -> dict[str, Any]:
    section = schema[key]
    if not isinstance(section, dict):
        raise DataError(f"{schema_path}: {key!r} must be an object")
    _check_keys(section, allowed, f"{schema_path}: {key!r}")
    if "file" not in section:
        raise DataError(f"{schema_path}: {key!r} needs a 'file'")
    return section


def _text(section: Mapping[str, Any], key: str, default: str, schema_path: Path) -> str:
    value = section.get(key, default)
    if not isinstance(value, str) or not value:
        raise DataError(f"{schema_path}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _read_table(directory: Path, spec: Mapping[str, Any], schema_path: Path) -> Table:
    separator = _text(spec, "separator", ",", schema_path)
    if len(separator) != 1:
        raise DataError(f"{schema_path}: 'separator' must be one character, got {separator!r}")
    return read_delimited(
        directory / _text(spec, "file", "", schema_path),
        separator,
        encoding=_text(spec, "encoding", "utf-8", schema_path),
        quoted=True,
    )


def _ids(table: Table, column: str) -> np.ndarray:
    return table.ids(column).to_numpy(dtype=object)


def _timestamps(table: Table, column: str) -> np.ndarray:
    values = table.column(column).str.strip()
    if len(values) == 0 or _is_number(values.iloc[0]):
        seconds = table.integers(column)
        late = int(np.count_nonzero(seconds > _YEAR_5000))
        if late:
            log.warning(
                "%s: %d of %d %r values are past the year 5000 as Unix seconds: if they are "
                "milliseconds, divide them by 1000",
                table.path,
                late,
                len(seconds),
                column,
            )
        return seconds
    times = pd.to_datetime(values, format="ISO8601", utc=True, errors="coerce")
    bad = times.isna().to_numpy()
    if bad.any():
        row = int(np.argmax(bad))
        table.fail(row, f"{column!r} is not an ISO-8601 time: {values.iloc[row]!r}")
    return ((times - _EPOCH) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _attributes(
    directory: Path, schema: Mapping[str, Any], key: str, default_id: str, schema_path: Path
) -> tuple[pd.DataFrame | None, tuple[ColumnSpec, ...]]:
    if key not in schema:
        return None, ()
    spec = _section(schema, key, _ATTRIBUTE_KEYS, schema_path)
    id_column = _text(spec, "id", default_id, schema_path)
    declared = spec.get("columns", {})
    if not isinstance(declared, dict):
        raise DataError(f"{schema_path}: {key}.columns must be an object")
    specs = tuple(
        _column_spec(column, options, f"{schema_path}: {key}.columns.{column}")
        for column, options in declared.items()
    )
    if id_column in declared:
        raise DataError(f"{schema_path}: {key}: the id column {id_column!r} cannot be a feature")
    table = _read_table(directory, spec, schema_path)
    values: dict[str, object] = {}
    for column in specs:
        if column.kind == "numeric":
            values[column.name] = table.floats(column.name)
        else:
            values[column.name] = categorical(table.column(column.name)).to_numpy()
    ids = pd.Series(_ids(table, id_column), dtype="str")
    return attribute_frame(ids, table, values, default_id), specs


def _column_spec(name: str, options: Any, where: str) -> ColumnSpec:
    if not isinstance(options, dict):
        raise DataError(f'{where}: expected an object like {{"kind": "categorical"}}')
    _check_keys(options, {"kind", "transform", "separator"}, where)
    kind = options.get("kind")
    if kind not in _KINDS:
        raise DataError(f"{where}: 'kind' must be one of {list(_KINDS)}, got {kind!r}")
    transform = options.get("transform", "standard")
    if "transform" in options and kind != "numeric":
        raise DataError(f"{where}: 'transform' applies to numeric columns only")
    if transform not in _TRANSFORMS:
        raise DataError(f"{where}: 'transform' must be one of {list(_TRANSFORMS)}")
    separator = options.get("separator", "|")
    if "separator" in options and kind != "multi_hot":
        raise DataError(f"{where}: 'separator' applies to multi_hot columns only")
    if not isinstance(separator, str) or not separator:
        raise DataError(f"{where}: 'separator' must be a non-empty string")
    return ColumnSpec(
        name, cast(ColumnKind, kind), cast(NumericTransform, transform), separator=separator
    )

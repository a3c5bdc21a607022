"""Shared pieces of the file-based sources: a delimited-text reader that keeps line numbers
for error messages, field parsers that name the offending row, and the final assembly of a
`Dataset` (sorting, id coverage) that every source goes through."""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd

from models.dataset import ColumnSpec, DataError, Dataset

# Multi-byte separators ("::") are rewritten to this byte so pandas' fast C parser can be used;
# the python engine that pandas would otherwise need is an order of magnitude slower.
_UNIT_SEPARATOR = "\x1f"
# The longest quoted field the CSV path reads (the csv module's default, 128 KiB, refused a
# long description column with a traceback); an unclosed quote stops at the end of the file.
MAX_FIELD = (1 << 31) - 1


@dataclass(frozen=True)
class Table:
    """A delimited file read as strings, with the source line of every row.

    Attributes:
        path: the file it came from.
        frame: one `str` column per field, empty fields as "".
        lines: 1-based line number in `path` of each row of `frame`.
    """

    path: Path
    frame: pd.DataFrame
    lines: np.ndarray

    def fail(self, row: int, message: str) -> NoReturn:
        """Raise a `DataError` naming this file and the line of `row` (0-based frame row)."""
        raise DataError(f"{self.path}: line {int(self.lines[row])}: {message}")

    def rename(self, names: dict[str, str]) -> Table:
        """The same table with columns renamed (`names`: old -> new)."""
        return Table(self.path, self.frame.rename(columns=names), self.lines)

    def column(self, name: str) -> pd.Series:
        """The column `name`; a `DataError` listing the file's columns if there is none."""
        if name not in self.frame.columns:
            found = ", ".join(map(str, self.frame.columns))
            raise DataError(f"{self.path}: no column {name!r} (columns: {found})")
        return self.frame[name]

    def ids(self, name: str) -> pd.Series:
        """The column `name` of ids, stripped, after checking that no row leaves it empty."""
        values = self.column(name).str.strip()
        empty = (values == "").to_numpy()
        if empty.any():
            self.fail(int(np.argmax(empty)), f"empty {name!r}")
        return values

    def integers(self, name: str) -> np.ndarray:
        """Column `name` as int64; integral floats ("881250949.0") are accepted."""
        values = self.column(name)
        try:
            return values.astype("int64").to_numpy()
        except (ValueError, TypeError, OverflowError):
            pass  # the slower path below finds the offending row
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(numbers) | (numbers != np.floor(numbers))
        bad |= np.abs(numbers) >= 2.0**63  # would wrap around in int64 ("1e30")
        if bad.any():
            row = int(np.argmax(bad))
            self.fail(row, f"{name!r} is not a 64-bit integer: {values.iloc[row]!r}")
        return numbers.astype(np.int64)

    def floats(self, name: str) -> np.ndarray:
        """Column `name` as float64; empty fields become NaN, anything else that is not a
        finite number ("abc", "nan", "inf", "1e400") fails."""
        values = self.column(name).str.strip()
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(numbers) & (values != "").to_numpy()
        if bad.any():
            row = int(np.argmax(bad))
            self.fail(row, f"{name!r} is not a finite number: {values.iloc[row]!r}")
        return numbers


def read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    return path.read_bytes()


def read_delimited(
    path: Path,
    sep: str,
    names: Sequence[str] | None = None,
    *,
    encoding: str = "utf-8",
    quoted: bool = False,
) -> Table:
    """Read a delimited text file into a `Table` of strings, checking every row's field count.

    Args:
        path: the file.
        sep: field separator, one or more characters.
        names: field names; None means the first line is a header holding them.
        encoding: text encoding of the file (MovieLens item files are latin-1).
        quoted: honour double-quoted fields (CSV); otherwise quotes are ordinary characters.

    Raises:
        DataError: the file is missing, or a row has the wrong number of fields.
    """
    raw = read_bytes(path)
    try:
        raw, encoding = _ascii_compatible(raw, encoding)
        # A carriage return ends a line alone too (old Mac files; a stray one in a cell), as
        # the parsers below take it: the row check must count the lines they see.
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return _parse(path, raw, sep, names, encoding, quoted)
    except (UnicodeDecodeError, LookupError) as error:
        raise DataError(f"{path}: cannot decode as {encoding!r}: {error}") from None
    except pd.errors.ParserError as error:
        raise DataError(f"{path}: {error}") from None


def _ascii_compatible(raw: bytes, encoding: str) -> tuple[bytes, str]:
    """`raw` in an encoding whose newlines and separators are single ASCII bytes, as the
    byte-level row check needs: as it is, or decoded and re-encoded as UTF-8 (UTF-16 and
    UTF-32, and `utf-8-sig`, whose byte-order mark the codec strips)."""
    probe = "\n\r,;\t|: azAZ09"
    if probe.encode(encoding) == probe.encode("ascii"):
        return raw, encoding
    return raw.decode(encoding).encode("utf-8"), "utf-8"


def _parse(
    path: Path, raw: bytes, sep: str, names: Sequence[str] | None, encoding: str, quoted: bool
) -> Table:
    # An editor's UTF-8 byte-order mark, whatever the declared encoding (read as latin-1, it
    # became part of the first id: "ï»¿1").
    raw = raw.removeprefix(codecs.BOM_UTF8)
    if quoted and b'"' in raw:
        return _read_quoted(path, raw.decode(encoding), sep, names)
    first_line = 1
    if names is None:
        if not raw.strip():
            raise DataError(f"{path}: empty file, expected a header line")
        header, _, raw = raw.partition(b"\n")
        names = [n.strip() for n in header.decode(encoding).split(sep)]
        first_line = 2
    _check_names(path, names)
    sep_bytes = sep.encode(encoding)
    if len(sep_bytes) > 1 and _UNIT_SEPARATOR.encode() not in raw:
        raw, sep = raw.replace(sep_bytes, _UNIT_SEPARATOR.encode()), _UNIT_SEPARATOR
    lines = _checked_lines(path, raw, sep.encode(encoding), len(names), first_line)
    if len(lines) == 0:
        return Table(path, pd.DataFrame({n: pd.Series([], dtype="str") for n in names}), lines)
    frame = pd.read_csv(
        io.BytesIO(raw),
        sep=sep if len(sep) == 1 else re.escape(sep),
        header=None,
        names=list(names),
        dtype=str,
        na_filter=False,
        quoting=csv.QUOTE_NONE,
        encoding=encoding,
        engine="c" if len(sep) == 1 else "python",
    )
    return Table(path, frame, lines)


def _check_names(path: Path, names: Sequence[str]) -> None:
    if any(not n for n in names) or len(set(names)) != len(names):
        raise DataError(f"{path}: header has empty or repeated column names: {list(names)}")


def _checked_lines(
    path: Path, raw: bytes, sep: bytes, n_fields: int, first_line: int
) -> np.ndarray:
    """Line numbers of the non-blank lines of `raw`, after checking each has `n_fields` fields.
    A line of spaces and tabs (other than the separator) is blank, as pandas skips it.

    Counting separators between newlines with numpy keeps this check vectorised, so a
    million-line file costs milliseconds rather than a Python loop.
    """
    data = np.frombuffer(raw, dtype=np.uint8)
    newlines = np.flatnonzero(data == ord("\n"))
    ends = newlines if raw.endswith(b"\n") else np.append(newlines, len(data))
    starts = np.concatenate(([0], newlines + 1))[: len(ends)]
    if len(sep) == 1:
        seps = np.flatnonzero(data == sep[0])
    else:
        seps = np.array([m.start() for m in re.finditer(re.escape(sep), raw)], dtype=np.int64)
    counts = np.searchsorted(seps, ends) - np.searchsorted(seps, starts) + 1
    blank = ends == starts
    # Only a line whose field count is off, or any line of a one-field file, may be spaces.
    spaces = bytes(c for c in b" \t" if bytes([c]) != sep)
    for line in np.flatnonzero(~blank & ((counts != n_fields) | (n_fields == 1))):
        blank[line] = not raw[starts[line] : ends[line]].strip(spaces)
    bad = ~blank & (counts != n_fields)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(
            f"{path}: line {i + first_line}: expected {n_fields} fields, found {int(counts[i])}"
        )
    return np.flatnonzero(~blank) + first_line


def _read_quoted(path: Path, text: str, sep: str, names: Sequence[str] | None) -> Table:
    """The CSV module path for files with quoted fields, where line numbers need a real parser.
    A row is numbered by the line it starts on (a quoted field may hold newlines)."""
    reader = csv.reader(io.StringIO(text), delimiter=sep)
    rows: list[list[str]] = []
    lines: list[int] = []
    start = 1
    limit = csv.field_size_limit(MAX_FIELD)
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip(" \t")):
                pass  # a blank line, as pandas reads one
            elif names is None:
                names = [n.strip() for n in row]
                _check_names(path, names)
            elif len(row) != len(names):
                spans = (
                    f" (the row runs to line {reader.line_num}: an unclosed quote?)"
                    if reader.line_num > start
                    else ""
                )
                raise DataError(
                    f"{path}: line {start}: expected {len(names)} fields, found {len(row)}{spans}"
                )
            else:
                rows.append(row)
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as error:
        raise DataError(f"{path}: line {start}: {error}") from None
    finally:
        csv.field_size_limit(limit)
    if names is None:
        raise DataError(f"{path}: empty file, expected a header line")
    frame = pd.DataFrame(rows, columns=list(names), dtype="str")
    return Table(path, frame, np.asarray(lines, dtype=np.int64))


def attribute_frame(
    ids: pd.Series, table: Table, columns: dict[str, object], index: str
) -> pd.DataFrame:
    """An attribute table indexed by `ids` (named `index`), checking that ids are unique."""
    duplicated = ids.duplicated().to_numpy()
    if duplicated.any():
        row = int(np.argmax(duplicated))
        table.fail(row, f"repeated {index} {ids.iloc[row]!r}")
    return pd.DataFrame(columns, index=pd.Index(ids.to_numpy(), name=index, dtype="str"))


def categorical(values: pd.Series) -> pd.Series:
    """Strip a string column and mark empty values as missing."""
    stripped = values.str.strip()
    return stripped.mask(stripped == "")


def assemble(
    name: str,
    interactions: pd.DataFrame,
    users: pd.DataFrame | None,
    items: pd.DataFrame | None,
    user_columns: Sequence[ColumnSpec],
    item_columns: Sequence[ColumnSpec],
) -> Dataset:
    """Build the final `Dataset`: interactions sorted by time (stable), the users table limited
    to users who interacted (the others are its `cold_users`), the item catalogue extended by
    every item that was interacted with.

    Args:
        name: the source string.
        interactions: `user_id`, `item_id` (str) and `timestamp` (int64) columns.
        users / items: attribute tables indexed by id, or None when the source has none.
        user_columns / item_columns: specs of the attribute columns, in table order.
    """
    if len(interactions) == 0:
        raise DataError(f"{name}: no interactions")
    interactions = (
        interactions[["user_id", "item_id", "timestamp"]]
        .astype({"user_id": "str", "item_id": "str", "timestamp": "int64"})
        .sort_values("timestamp", kind="stable")
        .reset_index(drop=True)
    )
    user_ids = pd.Index(pd.unique(interactions["user_id"]), dtype="str")
    item_ids = pd.Index(pd.unique(interactions["item_id"]), dtype="str")
    cold = None if users is None else users[~users.index.isin(user_ids)]
    users = _cover(users, user_ids, user_columns, "user_id", keep_unused=False)
    items = _cover(items, item_ids, item_columns, "item_id", keep_unused=True)
    if cold is not None:
        cold = _cover(cold, pd.Index([], dtype="str"), user_columns, "user_id", keep_unused=True)
    specs = tuple(user_columns), tuple(item_columns)
    return Dataset(name, interactions, users, items, *specs, cold_users=cold)


def _cover(
    table: pd.DataFrame | None,
    ids: pd.Index,
    specs: Sequence[ColumnSpec],
    index_name: str,
    *,
    keep_unused: bool,
) -> pd.DataFrame:
    if table is None:
        table = pd.DataFrame(index=pd.Index([], dtype="str"))
    known = table.index if keep_unused else table.index[table.index.isin(ids)]
    order = known.append(ids[~ids.isin(table.index)])
    covered = table.reindex(order)[[s.name for s in specs]]
    covered.index = pd.Index(order, dtype="str", name=index_name)
    for spec in specs:
        if spec.kind == "numeric":
            covered[spec.name] = covered[spec.name].astype("float64")
    return covered

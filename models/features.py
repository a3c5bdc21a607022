"""The one feature encoder shared by training and serving.

It is built (fitted) from the training data, saved as `feature_spec.json` in the bundle and
loaded back by the online service, so raw user attributes and behaviour are turned into
tensors by exactly the same code offline and online. It depends on numpy and the standard
library only, so the service can import it without pulling in the trainer.

Encoded layout, one array per feature, batch first:
- categorical: int64 `(B,)`, vocabulary index, 0 = unknown or missing
- multi_hot: int64 `(B, max_values)`, vocabulary indices, 0-padded
- numeric `standard` / `log`: float32 `(B,)`, standardised and clipped to +-Z_CLIP, missing
  = 0 (the mean)
- numeric `bucket`: int64 `(B,)`, bucket index 1..n, 0 = missing
- history: int64 `(B, length)`, item index + 1 (row of `item_ids.json` + 1), newest first,
  0-padded; unknown items are dropped before truncation.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import numpy as np

from models.feature_spec import (
    FORMAT_VERSION,
    HISTORY,
    Z_CLIP,
    ColumnKind,
    Feature,
    FeatureSpecError,
    as_float,
    is_missing,
    split_multi,
)


class FeatureEncoder:
    """Encodes raw attributes (and, for users, behaviour history) into model inputs.

    Args:
        features: the attribute features, in model order.
        history_length: 0 for no history feature (item side), else items kept.
        item_index: item id -> row in the item catalogue; required when history_length > 0.

    Example:
        >>> enc = FeatureEncoder.load(bundle_dir / "feature_spec.json", item_ids)
        >>> batch = enc.encode([{"gender": "F"}], [["1193", "661"]])
        >>> batch["history"].shape
        (1, 50)
    """

    def __init__(
        self,
        features: Sequence[Feature],
        history_length: int = 0,
        item_index: Mapping[str, int] | None = None,
    ) -> None:
        names = [f.name for f in features]
        if len(set(names)) != len(names) or HISTORY in names:
            raise FeatureSpecError(f"feature names must be unique and not {HISTORY!r}: {names}")
        if history_length > 0 and item_index is None:
            raise FeatureSpecError("a history feature needs the item index")
        self.features: tuple[Feature, ...] = tuple(features)
        self.history_length = history_length
        self.item_index: Mapping[str, int] = item_index or {}
        self.by_name = {f.name: f for f in self.features}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def input_names(self) -> tuple[str, ...]:
        """Keys of the encoded dict, in order."""
        return self.names + ((HISTORY,) if self.history_length else ())

    # -- serialisation -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        specs = [f.to_json() for f in self.features]
        if self.history_length:
            specs.append(Feature(HISTORY, "history", length=self.history_length).to_json())
        return {"format_version": FORMAT_VERSION, "features": specs}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True))

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], item_index: Mapping[str, int] | None = None
    ) -> FeatureEncoder:
        if data.get("format_version") != FORMAT_VERSION:
            raise FeatureSpecError(f"unsupported feature spec version {data.get('format_version')}")
        features: list[Feature] = []
        history_length = 0
        try:
            for raw in data["features"]:
                if raw["kind"] == HISTORY:
                    history_length = int(raw["length"])
                    if history_length < 0:
                        raise FeatureSpecError("history length must not be negative")
                    continue
                kwargs = {k: v for k, v in raw.items() if k in Feature.__dataclass_fields__}
                feature = Feature(**kwargs)
                if feature.kind not in get_args(ColumnKind):
                    raise FeatureSpecError(f"unknown feature kind {feature.kind!r}")
                feature.check()
                features.append(feature)
        except FeatureSpecError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise FeatureSpecError(f"malformed feature spec: {exc!r}") from exc
        return cls(features, history_length, item_index)

    @classmethod
    def load(cls, path: Path, item_ids: Sequence[str] | None = None) -> FeatureEncoder:
        index = {item: i for i, item in enumerate(item_ids)} if item_ids is not None else None
        return cls.from_json(json.loads(path.read_text()), index)

    def largest_row(self) -> dict[str, Any]:
        """Raw attributes that encode to each feature's largest index: a probe on which a
        model whose tables are smaller than this spec fails at once."""
        row: dict[str, Any] = {}
        for f in self.features:
            if f.kind in ("categorical", "multi_hot") and f.vocabulary:
                row[f.name] = max(f.vocabulary, key=f.vocabulary.__getitem__)
            elif f.kind == "numeric":
                row[f.name] = f.boundaries[-1] + 1.0 if f.boundaries else f.mean
        return row

    # -- encoding ------------------------------------------------------------------------
    def encode_column(self, feature: Feature, values: Sequence[Any]) -> np.ndarray:
        """Encode one feature over a batch of raw values (see the module doc for layouts)."""
        if feature.kind == "categorical":
            vocab = feature.vocabulary
            return np.fromiter(
                (0 if is_missing(v) else vocab.get(str(v), 0) for v in values),
                dtype=np.int64,
                count=len(values),
            )
        if feature.kind == "multi_hot":
            out = np.zeros((len(values), feature.max_values), dtype=np.int64)
            for row, value in enumerate(values):
                ids = [feature.vocabulary.get(v, 0) for v in split_multi(value, feature.separator)]
                ids = [i for i in ids if i][: feature.max_values]
                out[row, : len(ids)] = ids
            return out
        x = np.fromiter((as_float(v) for v in values), dtype=np.float64, count=len(values))
        missing = ~np.isfinite(x)
        if feature.transform == "bucket":
            idx = np.searchsorted(np.asarray(feature.boundaries), x, side="right") + 1
            return np.where(missing, 0, idx).astype(np.int64)
        if feature.std == 0:  # constant in training: its weights know no other value
            return np.zeros(len(values), dtype=np.float32)
        if feature.transform == "log":
            x = np.log1p(np.maximum(x, 0.0))
        with np.errstate(over="ignore"):  # a huge value is clipped like any beyond Z_CLIP
            z = np.clip((x - feature.mean) / feature.std, -Z_CLIP, Z_CLIP)
        return np.where(missing, 0.0, z).astype(np.float32)

    def history_rows(self, items: Iterable[str]) -> list[int]:
        """Catalogue rows of the known items, in order (unknown ids are skipped). One dict
        lookup an item, which over a large catalogue is a cache miss or two: serving maps a
        history once, for the encoder and the seen-item exclusion both."""
        return [row for row in map(self.item_index.get, items) if row is not None]

    def newest_rows(self, items: Sequence[str]) -> tuple[list[int], int]:
        """The rows of the newest `history_length` known items of `items` (newest first;
        unknown ids skipped, as `encode_history` and training skip them), and how many ids
        that took: what the tower reads. Serving maps no more than that (`app.retrieval`)."""
        rows: list[int] = []
        get, wanted = self.item_index.get, self.history_length
        for taken, item in enumerate(items):
            if len(rows) == wanted:
                return rows, taken
            row = get(item)
            if row is not None:
                rows.append(row)
        return rows, len(items)

    def encode_history(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        """Item ids (newest first) -> int64 `(B, history_length)`; unknown ids are skipped."""
        return self.encode_history_rows([self.history_rows(items) for items in histories])

    def encode_history_rows(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Catalogue rows (newest first, as `history_rows` gives them) -> int64
        `(B, history_length)`: row + 1, the newest `history_length`, 0-padded."""
        length = self.history_length
        kept = [min(len(r), length) for r in rows]
        out = np.zeros((len(rows), length), dtype=np.int64)
        filled = np.arange(length) < np.asarray(kept, dtype=np.int64)[:, None]
        out[filled] = np.fromiter(
            itertools.chain.from_iterable(r[:length] for r in rows), np.int64, sum(kept)
        )
        out[filled] += 1
        return out

    def encode(
        self,
        rows: Sequence[Mapping[str, Any]],
        histories: Sequence[Sequence[str]] | None = None,
        *,
        history_rows: Sequence[Sequence[int]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Encode a batch of raw attribute dicts (missing keys = missing values) and item-id
        histories (or the same already mapped by `history_rows`)."""
        columns = {f.name: [row.get(f.name) for row in rows] for f in self.features}
        return self.encode_columns(
            columns, histories, batch_size=len(rows), history_rows=history_rows
        )

    def encode_columns(
        self,
        columns: Mapping[str, Sequence[Any]],
        histories: Sequence[Sequence[str]] | None = None,
        *,
        batch_size: int,
        history_rows: Sequence[Sequence[int]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Encode column-wise raw values (a missing column = all values missing)."""
        out = {
            f.name: self.encode_column(f, columns.get(f.name, [None] * batch_size))
            for f in self.features
        }
        if self.history_length:
            if history_rows is None:
                history_rows = [self.history_rows(h) for h in histories or [[]] * batch_size]
            out[HISTORY] = self.encode_history_rows(history_rows)
        return out

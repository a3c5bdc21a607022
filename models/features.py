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
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

FORMAT_VERSION = 1
# Standardised values are clipped to this many standard deviations: the model has seen next
# to nothing beyond, and a wild value (1e300 in a request) would overflow float32 and turn the
# user's vector, and every score, into NaN.
Z_CLIP = 10.0
FeatureKind = Literal["categorical", "multi_hot", "numeric", "history"]
HISTORY = "history"


class FeatureSpecError(ValueError):
    """`feature_spec.json` is malformed or inconsistent."""


@dataclass(frozen=True)
class Feature:
    """One encoded feature. Only the fields of its kind are meaningful.

    Attributes:
        name: raw attribute name (the key in request `features` and in Redis).
        kind: categorical | multi_hot | numeric | history.
        vocabulary: raw value -> index (1-based; 0 = unknown); categorical and multi_hot.
        separator: multi_hot raw strings are split on it ("Action|Comedy").
        max_values: multi_hot width after padding/truncation.
        transform: numeric: standard | log | bucket.
        mean, std: numeric standard/log normalisation (after log1p for `log`).
        boundaries: numeric bucket edges; value v goes to bucket searchsorted(edges, v) + 1.
        length: history length (most recent items kept).
    """

    name: str
    kind: FeatureKind
    vocabulary: dict[str, int] = field(default_factory=dict)
    separator: str = "|"
    max_values: int = 0
    transform: str = "standard"
    mean: float = 0.0
    std: float = 1.0
    boundaries: list[float] = field(default_factory=list)
    length: int = 0

    @property
    def cardinality(self) -> int:
        """Embedding rows this feature needs (index 0 included); 0 for dense numerics."""
        if self.kind in ("categorical", "multi_hot"):
            return len(self.vocabulary) + 1
        if self.kind == "numeric" and self.transform == "bucket":
            return len(self.boundaries) + 2
        return 0

    def check(self) -> None:
        """Raise FeatureSpecError for a spec this encoder would turn into out-of-range
        indices or non-finite values (a hand-edited or corrupt `feature_spec.json`)."""
        indices = list(self.vocabulary.values())
        if sorted(indices) != list(range(1, len(indices) + 1)):
            raise FeatureSpecError(f"feature {self.name!r}: vocabulary indices must be 1..n")
        if self.kind == "multi_hot" and self.max_values < 1:
            raise FeatureSpecError(f"feature {self.name!r}: max_values must be at least 1")
        if self.kind != "numeric":
            return
        if self.transform not in ("standard", "log", "bucket"):
            raise FeatureSpecError(f"feature {self.name!r}: unknown transform {self.transform!r}")
        edges = np.asarray(self.boundaries, dtype=np.float64)
        finite = math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0
        if not finite or not np.isfinite(edges).all() or (np.diff(edges) <= 0).any():
            raise FeatureSpecError(
                f"feature {self.name!r}: needs a finite mean, a positive std and increasing "
                "finite bucket boundaries"
            )

    @property
    def is_dense(self) -> bool:
        return self.kind == "numeric" and self.transform != "bucket"

    def to_json(self) -> dict[str, Any]:
        keep = {
            "categorical": ("vocabulary",),
            "multi_hot": ("vocabulary", "separator", "max_values"),
            "numeric": ("transform", "mean", "std", "boundaries"),
            "history": ("length",),
        }[self.kind]
        data = asdict(self)
        out = {"name": self.name, "kind": self.kind} | {k: data[k] for k in keep}
        if self.kind == "numeric":
            unused = ("mean", "std") if self.transform == "bucket" else ("boundaries",)
            for key in unused:
                del out[key]
        if self.kind == HISTORY:
            # The vocabulary is the bundle's item list: index = row of item_ids.json + 1.
            out["vocabulary"] = "item_ids.json"
        return out


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _split_multi(value: Any, separator: str) -> list[str]:
    if _is_missing(value):
        return []
    if isinstance(value, str):
        return [v for v in value.split(separator) if v]
    if isinstance(value, Iterable):
        return [str(v) for v in value]
    return [str(value)]


def _as_float(value: Any) -> float:
    if _is_missing(value) or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def _vocabulary(values: Iterable[str], min_count: int) -> dict[str, int]:
    counts = Counter(values)
    # Most frequent first, ties by value: deterministic indices for a given dataset.
    kept = sorted((v for v, c in counts.items() if c >= min_count), key=lambda v: (-counts[v], v))
    return {v: i + 1 for i, v in enumerate(kept)}


def fit_feature(
    name: str,
    kind: FeatureKind,
    values: Sequence[Any],
    *,
    transform: str = "standard",
    separator: str = "|",
    buckets: int = 10,
    min_count: int = 1,
) -> Feature:
    """Fit one feature's vocabulary or normalisation from its raw training values."""
    if kind == "categorical":
        vocab = _vocabulary((str(v) for v in values if not _is_missing(v)), min_count)
        return Feature(name, kind, vocabulary=vocab)
    if kind == "multi_hot":
        lists = [_split_multi(v, separator) for v in values]
        vocab = _vocabulary((v for lst in lists for v in lst), min_count)
        width = max((len(lst) for lst in lists), default=1)
        return Feature(name, kind, vocabulary=vocab, separator=separator, max_values=max(width, 1))
    if kind == "numeric":
        x = np.array([_as_float(v) for v in values], dtype=np.float64)
        x = x[np.isfinite(x)]
        if transform == "bucket":
            quantiles = np.linspace(0, 1, buckets + 1)[1:-1]
            edges = [float(e) for e in np.unique(np.quantile(x, quantiles))] if x.size else []
            return Feature(name, kind, transform=transform, boundaries=edges)
        if transform == "log":
            x = np.log1p(np.maximum(x, 0.0))
        elif transform != "standard":
            raise FeatureSpecError(f"feature {name!r}: unknown numeric transform {transform!r}")
        mean = float(x.mean()) if x.size else 0.0
        std = float(x.std()) if x.size else 1.0
        return Feature(name, kind, transform=transform, mean=mean, std=std if std > 0 else 1.0)
    raise FeatureSpecError(f"feature {name!r}: cannot fit kind {kind!r}")


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
                if feature.kind not in ("categorical", "multi_hot", "numeric"):
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
                (0 if _is_missing(v) else vocab.get(str(v), 0) for v in values),
                dtype=np.int64,
                count=len(values),
            )
        if feature.kind == "multi_hot":
            out = np.zeros((len(values), feature.max_values), dtype=np.int64)
            for row, value in enumerate(values):
                ids = [feature.vocabulary.get(v, 0) for v in _split_multi(value, feature.separator)]
                ids = [i for i in ids if i][: feature.max_values]
                out[row, : len(ids)] = ids
            return out
        x = np.fromiter((_as_float(v) for v in values), dtype=np.float64, count=len(values))
        missing = ~np.isfinite(x)
        if feature.transform == "bucket":
            idx = np.searchsorted(np.asarray(feature.boundaries), x, side="right") + 1
            return np.where(missing, 0, idx).astype(np.int64)
        if feature.transform == "log":
            x = np.log1p(np.maximum(x, 0.0))
        z = np.clip((x - feature.mean) / feature.std, -Z_CLIP, Z_CLIP)
        return np.where(missing, 0.0, z).astype(np.float32)

    def history_rows(self, items: Iterable[str]) -> list[int]:
        """Catalogue rows of the known items, in order (unknown ids are skipped). One dict
        lookup an item, which over a large catalogue is a cache miss or two: serving maps a
        history once, for the encoder and the seen-item exclusion both."""
        return [row for row in map(self.item_index.get, items) if row is not None]

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

    def unknown_names(self, names: Iterable[str]) -> list[str]:
        """Names that are not attribute features of this encoder (request validation)."""
        return sorted(set(names) - set(self.names))

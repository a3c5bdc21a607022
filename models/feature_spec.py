"""One feature's spec: its kind, vocabulary or normalisation, fitted from training values.

`models.features.FeatureEncoder` encodes with a list of these; `feature_spec.json` in a
bundle is their JSON. Numpy and the standard library only: the service imports it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import numpy as np

FORMAT_VERSION = 1
# Standardised values are clipped to this many standard deviations: the model has seen next
# to nothing beyond, and a wild value (1e300 in a request) would overflow float32 and turn the
# user's vector, and every score, into NaN.
Z_CLIP = 10.0
# The kinds of a data column (a user or item attribute) and of a numeric column's transform,
# declared once: the sources, the encoder and the item attributes all read these.
ColumnKind = Literal["categorical", "multi_hot", "numeric"]
NumericTransform = Literal["standard", "log", "bucket"]
FeatureKind = Literal[ColumnKind, "history"]
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
        mean, std: numeric standard/log normalisation (after log1p for `log`); std 0: the
            feature never varied in training, and every value encodes as 0.
        boundaries: numeric bucket edges; value v goes to bucket searchsorted(edges, v) + 1.
        length: history length (most recent items kept).
    """

    name: str
    kind: FeatureKind
    vocabulary: dict[str, int] = field(default_factory=dict)
    separator: str = "|"
    max_values: int = 0
    transform: NumericTransform = "standard"
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
        if self.transform not in get_args(NumericTransform):
            raise FeatureSpecError(f"feature {self.name!r}: unknown transform {self.transform!r}")
        edges = np.asarray(self.boundaries, dtype=np.float64)
        finite = math.isfinite(self.mean) and math.isfinite(self.std) and self.std >= 0
        if not finite or not np.isfinite(edges).all() or (np.diff(edges) <= 0).any():
            raise FeatureSpecError(
                f"feature {self.name!r}: needs a finite mean, a std >= 0 and increasing "
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


def is_missing(value: Any) -> bool:
    """None or NaN: a raw value that is not there."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def split_multi(value: Any, separator: str) -> list[str]:
    """A multi-hot raw value (`"Action|Comedy"` or a list) as its values; none for a mapping
    (a stored `{"jazz": 0}`: its keys are not values it holds)."""
    if is_missing(value) or isinstance(value, Mapping):
        return []
    if isinstance(value, str):
        return [v for v in value.split(separator) if v]
    if isinstance(value, Iterable):
        return [str(v) for v in value]
    return [str(value)]


def as_float(value: Any) -> float:
    """A numeric raw value as a float; NaN where it is missing or not a number."""
    if is_missing(value) or isinstance(value, bool):
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
    transform: NumericTransform = "standard",
    separator: str = "|",
    buckets: int = 10,
    min_count: int = 1,
) -> Feature:
    """Fit one feature's vocabulary or normalisation from its raw training values."""
    if kind == "categorical":
        vocab = _vocabulary((str(v) for v in values if not is_missing(v)), min_count)
        return Feature(name, kind, vocabulary=vocab)
    if kind == "multi_hot":
        lists = [split_multi(v, separator) for v in values]
        vocab = _vocabulary((v for lst in lists for v in lst), min_count)
        width = max((len(lst) for lst in lists), default=1)
        return Feature(name, kind, vocabulary=vocab, separator=separator, max_values=max(width, 1))
    if kind == "numeric":
        x = np.array([as_float(v) for v in values], dtype=np.float64)
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
        # 0: the value never varied in training (or was always missing), so its weights never
        # learned what a change means; every value then encodes as 0 (`encode_column`).
        std = float(x.std()) if x.size else 0.0
        return Feature(name, kind, transform=transform, mean=mean, std=std)
    raise FeatureSpecError(f"feature {name!r}: cannot fit kind {kind!r}")

"""Latency percentiles, as every load the benchmarks and the fault suite time reports them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def percentile_ms(seconds: Sequence[float], q: float, digits: int = 3) -> float | None:
    """The `q` quantile (0..1) of latencies in `seconds`, in milliseconds rounded to `digits`;
    None without samples. Linear between the nearest ranks (numpy's default): the p99 of a
    handful of samples is not simply the slowest one, as `sorted[int(q * n)]` made it."""
    if len(seconds) == 0:
        return None
    return round(float(np.percentile(seconds, q * 100)) * 1000, digits)

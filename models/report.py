"""The evaluation report: the `evaluate --json` document and its text table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from models.evaluation import EvalResult
from models.metrics import CI_RESAMPLES, CI_SEED


def report_json(
    split_name: str, test: pd.DataFrame, results: Mapping[str, EvalResult]
) -> dict[str, Any]:
    """The `evaluate --json` document of docs/design.md, with a 95 % interval beside each mean.

    Returns:
        `{"split", "n_test_users", "n_test_interactions", "results": {name: {metric: mean}},
        "ci95": {name: {metric: [low, high]}}}`; the counts describe the test frame as given
        (before seen-item exclusion). `ci95` holds percentile bootstrap intervals over the
        evaluated users (`CI_RESAMPLES` resamples drawn with `CI_SEED`, the same for every
        model and metric), so the same evaluation always reports the same intervals.
    """
    return {
        "split": split_name,
        "n_test_users": int(test["user_id"].nunique()),
        "n_test_interactions": len(test),
        "results": {name: dict(result.means) for name, result in results.items()},
        "ci95": {
            name: {
                metric: [low, high]
                for metric, (low, high) in result.intervals(CI_RESAMPLES, CI_SEED).items()
            }
            for name, result in results.items()
        },
    }


_SHORT = {"recall": "R", "hit_rate": "HR", "ndcg": "NDCG"}
_CI_ROWS = ("  ci95 low", "  ci95 high")


def format_table(report: Mapping[str, Any]) -> str:
    """A `report_json` document as an aligned text table, methods x metrics.

    Each method's row of means is followed by the low and the high bounds of its `ci95`
    intervals, when the report holds them (reports written before intervals do not).
    """
    results: Mapping[str, Mapping[str, float]] = report["results"]
    intervals: Mapping[str, Mapping[str, Sequence[float]]] = report.get("ci95") or {}
    metrics = list(dict.fromkeys(m for values in results.values() for m in values))
    headers = []
    for metric in metrics:
        family, _, k = metric.partition("@")
        headers.append(f"{_SHORT.get(family, family)}@{k}")
    labels = [*results, *(_CI_ROWS if intervals else ())]
    name_width = max(len(label) for label in ["method", *labels])
    widths = [max(len(h), 6) for h in headers]

    def row(label: str, values: Mapping[str, float]) -> str:
        cells = [
            f"{values[m]:.4f}".rjust(w) if m in values else "-".rjust(w)
            for m, w in zip(metrics, widths, strict=True)
        ]
        return "  ".join([label.ljust(name_width), *cells])

    lines = [
        f"split {report['split']}: {report['n_test_users']} test users, "
        f"{report['n_test_interactions']} test interactions",
        "  ".join(
            [
                "method".ljust(name_width),
                *(h.rjust(w) for h, w in zip(headers, widths, strict=True)),
            ]
        ),
    ]
    for name, values in results.items():
        lines.append(row(name, values))
        if name in intervals:
            for bound, label in enumerate(_CI_ROWS):
                lines.append(row(label, {m: ci[bound] for m, ci in intervals[name].items()}))
    return "\n".join(lines)

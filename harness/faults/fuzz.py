"""Property-based fuzzing of every operation of the OpenAPI document with schemathesis:
valid (positive) and invalid (negative) requests generated from the schemas, each answer
checked for a 5xx, an undocumented status, a wrong content type or a body that breaks the
documented response schema.

The same code fuzzes the app in process (`schemathesis.openapi.from_asgi`, in CI) and a
running service over HTTP (`from_url`, benchmarks/faults.py).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import schemathesis
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# Not `positive_data_acceptance`: valid-looking input may still be refused by what only the
# loaded model knows (its feature names), which is documented as a 422.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@dataclass
class FuzzReport:
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # one line each: operation, mode, why

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "statuses": dict(sorted(self.statuses.items())),
            "failures": self.failures,
        }


def fuzz(
    schema: Any, max_examples: int, headers: dict[str, str], seed: int | None = None
) -> FuzzReport:
    """Up to `max_examples` positive and as many negative cases per operation of `schema`
    (a schemathesis schema), sent with `headers` (e.g. the admin token). `seed` None:
    derandomized (the same cases every run)."""
    report = FuzzReport()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in schemathesis.GenerationMode:
            label = f"{operation.label} ({mode})"

            @hypothesis.settings(
                max_examples=max_examples,
                deadline=None,
                database=None,
                derandomize=seed is None,
                suppress_health_check=list(hypothesis.HealthCheck),
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def one(case: schemathesis.Case) -> None:
                start = time.perf_counter()
                response = case.call(headers=headers)
                report.latencies_s.append(time.perf_counter() - start)
                report.requests += 1
                report.statuses[response.status_code] += 1
                try:
                    case.validate_response(response, checks=CHECKS)
                except BaseExceptionGroup as exc:  # schemathesis' FailureGroup
                    first = str(exc).strip().split("\n\n")
                    report.failures.append(f"{label}: {' / '.join(first[1:3])[:300]}")  # noqa: B023

            if seed is not None:
                one = hypothesis.seed(seed)(one)
            # Unsatisfiable: no input to make invalid (GET /health/live): nothing to fuzz.
            with contextlib.suppress(Unsatisfiable):
                one()
    return report

"""One row per scenario phase: what was sent, what failed, latency, recovery, and the
problems found (a broken expectation each); a markdown table of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.faults.traffic import Stats


@dataclass
class Row:
    """Args:
    scenario: name of the scenario phase.
    stats: the recall load during the phase (requests, failures, p50/p99).
    recovery_s: seconds until the service was whole again after the fault (None: no fault
        to recover from, or it never recovered, which is then a problem).
    detail: what happened, in a few words.
    problems: every expectation the phase broke; empty when it behaved.
    data: the phase's figures in full, for --json.
    """

    scenario: str
    stats: Stats
    recovery_s: float | None = None
    detail: str = ""
    problems: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def expect(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            **asdict(self.stats),
            "recovery_s": self.recovery_s,
            "detail": self.detail,
            "problems": self.problems,
            "data": self.data,
        }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| scenario | requests | failures | p50 ms | p99 ms | recovery s | result |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        s = row.stats
        result = "; ".join(row.problems) if row.problems else f"ok: {row.detail}"
        cells = [row.scenario, s.requests, s.failures, s.p50_ms, s.p99_ms, row.recovery_s, result]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)

"""The quality benchmark's JSON as markdown: a summary of the splits, then one table each
(two-tower mean [interval], its seeds' min..max, each baseline, the published rows), its
targets with pass or fail and training times, and the ratios. Several runs' JSON (one process
per split) merge into one table when their data, seeds and trainer options agree."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from quality_kit.references import METRICS, TABLE_METRICS

DASH, TIMES = "\u2013", "\u00d7"
LABELS = {
    "two_tower": "two-tower",
    "most_popular": "most-popular",
    "itemcf": "itemCF",
    "itemcf_iuf": "itemCF-IUF",
    "ease": "EASE",
    **{m: m.replace("ndcg", "NDCG").replace("_", " ") for m in METRICS},
}


def _cell(figure: Mapping[str, Any], metric: str) -> str:
    low, high = figure["ci95"][metric]
    return f"{figure['means'][metric]:.4f} [{low:.3f}, {high:.3f}]"


def _span(bounds: Sequence[float] | None, digits: int = 3) -> str:
    if bounds is None:
        return DASH
    low, high = bounds
    return f"{low:.{digits}f}" if low == high else f"{low:.{digits}f}{DASH}{high:.{digits}f}"


def _ratio(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}{TIMES}"


def merge(tables: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several runs' JSON as one table (e.g. one process per split on a 2-core machine)."""
    merged = dict(tables[0])
    for other in tables[1:]:
        differ = [k for k in ("data", "seeds") if other[k] != merged[k]]
        if other["trainer"] != merged["trainer"]:
            differ.append("trainer options")
        if differ:
            raise ValueError(f"the runs differ in {', '.join(differ)}: not one table")
    for key, joint in (("command", " && "), ("commit", ", ")):
        merged[key] = joint.join(dict.fromkeys(str(t[key]) for t in tables))
    merged["splits"] = {k: v for t in tables for k, v in t["splits"].items()}
    merged["pass"] = passed(merged["splits"])
    return merged


def passed(splits: Mapping[str, Any]) -> bool:
    """Every target of every measured split met, and at least one split measured."""
    measured = [s for s in splits.values() if s["applicable"]]
    return bool(measured) and all(s["pass"] for s in measured)


def render(table: Mapping[str, Any]) -> str:
    """The markdown of a benchmark's JSON: a summary of the splits, then one table each."""
    options = table["trainer"]["options"]
    trainer = " ".join(f"{k}={v}" for k, v in options.items()) if options else "defaults"
    seeds = ", ".join(map(str, table["seeds"]))
    lines = [
        f"## Retrieval quality: {table['dataset']}",
        "",
        f"`{table['command']}` (commit {table['commit']}). Trainer: {trainer}. Two-tower: mean "
        f"of seeds {seeds} (per-user figures averaged over the seeds); baselines once per split "
        "(deterministic); one evaluation code for all, seen items excluded. [low, high]: "
        f"{table['intervals']}; seeds: min..max of the seeds' figures.",
        "",
        "| split | protocol | test users | targets |",
        "|---|---|---|---|",
    ]
    lines += [_summary_row(spec, s) for spec, s in table["splits"].items()]
    for spec, s in table["splits"].items():
        if s["applicable"]:
            lines += ["", *_split_table(spec, s)]
    return "\n".join(lines)


def _summary_row(spec: str, s: Mapping[str, Any]) -> str:
    what = f"**{s['protocol']['name']}**: {s['protocol']['description']}"
    if not s["applicable"]:
        return f"| `{spec}` | {what} | {DASH} | not applicable: {s['reason']} |"
    ratios_met = sum(c["pass"] for c in s["targets"])
    verdict = (
        f"{ratios_met} of {len(s['targets'])} ratio targets met"
        if s["targets"]
        else "no ratio target"
    )
    training = _training_verdict(s["training"], met="met", failed="**not met**")
    return f"| `{spec}` | {what} | {s['n_test_users']} | {verdict}; training time {training} |"


def _split_table(spec: str, s: Mapping[str, Any]) -> list[str]:
    return [
        f"### `{spec}` ({s['protocol']['name']}; {_tower(s)})",
        "",
        *_method_rows(s),
        "",
        *_target_rows(s),
        "",
        _ratio_line(s["ratios"]),
    ]


def _tower(s: Mapping[str, Any]) -> str:
    config = s.get("trainer_config")  # absent from JSON saved before 2026-12-06
    return "user tower: " + (config["tower"]["user_tower"] if config else "see the trainer")


def _method_rows(s: Mapping[str, Any]) -> list[str]:
    """The methods' table: two-tower, its seeds' range, each baseline, the published rows."""
    methods, cols = s["methods"], len(TABLE_METRICS)
    ours = methods["two_tower"]
    lines = [
        "| method | " + " | ".join(LABELS[m] for m in TABLE_METRICS) + " |",
        "|---|" + "---|" * cols,
        f"| **two-tower** (mean of {len(s['two_tower_runs'])}) | "
        + " | ".join(_cell(ours, m) for m in TABLE_METRICS)
        + " |",
        "| ↳ seeds min..max | "
        + " | ".join("{:.4f}..{:.4f}".format(*ours["seed_range"][m]) for m in TABLE_METRICS)
        + " |",
    ]
    for name, figure in methods.items():
        if name != "two_tower":
            lines.append(
                f"| {LABELS[name]} | " + " | ".join(_cell(figure, m) for m in TABLE_METRICS) + " |"
            )
    for ref in s.get("published_references", ()):
        cells = [DASH] * cols
        cells[TABLE_METRICS.index("recall@10")] = f"HR@10 {_span(ref['hit_rate@10'])}"
        cells[TABLE_METRICS.index("ndcg@10")] = _span(ref["ndcg@10"])
        lines.append(f"| *published, full ML-1M: {ref['name']}* | " + " | ".join(cells) + " |")
    if "published_references" in s:
        lines += [
            "",
            "Published rows: full ML-1M (6,040 users), leave-one-out with full ranking; not "
            f"comparable one-to-one with ours (ML-1M users 1{DASH}2999). One held-out item per "
            "user, so HR@10 is recall@10.",
        ]
    return lines


def _target_rows(s: Mapping[str, Any]) -> list[str]:
    """The targets' table: each ratio target with pass or fail, then the training time."""
    lines = [
        "| target | two-tower | against | ratio | target | |",
        "|---|---|---|---|---|---|",
    ]
    for c in s["targets"]:
        against = f"{LABELS[c['baseline']]} {c['baseline_value']:.4f}"
        if c["against"] != c["baseline"]:
            against = f"best baseline: {against}"
        lines.append(
            f"| {LABELS[c['metric']]} | {c['two_tower']:.4f} | {against} | {_ratio(c['ratio'])} "
            f"| ≥ {c['target']:g}{TIMES} | {'pass' if c['pass'] else '**fail**'} |"
        )
    training = s["training"]
    times = " / ".join(f"{t:.0f}" for t in training["seconds"])
    lines.append(
        f"| training per run | {times} s | | | ≤ {training['limit_seconds']:.0f} s "
        f"| {_training_verdict(training, met='pass', failed='**fail**')} |"
    )
    return lines


def _training_verdict(training: Mapping[str, Any], *, met: str, failed: str) -> str:
    """Met / failed, or not judged where runs shared the machine (`runs_at_once`; JSON from
    before that field judged every run)."""
    if training["pass"] is None:
        return f"not judged ({training['runs_at_once']} runs shared the cores)"
    return met if training["pass"] else failed


def _ratio_line(ratios: Mapping[str, Any]) -> str:
    best, ease = ratios["vs_best_baseline"], ratios["vs_ease"]
    return (
        "Two-tower / best baseline: "
        + ", ".join(
            f"{LABELS[m]} {_ratio(c['ratio'])} ({LABELS[c['baseline']]})" for m, c in best.items()
        )
        + "; / EASE: "
        + ", ".join(f"{LABELS[m]} {_ratio(c['ratio'])}" for m, c in ease.items())
        + "."
    )

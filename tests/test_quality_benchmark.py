"""The quality benchmark end to end on the built-in synthetic source (ML-1M is not in CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"
BASELINES = {"most_popular", "itemcf", "itemcf_iuf", "ease"}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_quality_table_every_method_with_intervals_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    done = run(
        *("--data", "synthetic:seed=1,users=300,items=200", "--splits", "last-10pct"),
        *("--seeds", "0,1", "--epochs", "2", "--batch-size", "256", "--json", str(out)),
    )
    assert done.returncode == 0, done.stderr
    table = json.loads(out.read_text())
    assert json.loads(done.stdout) == table
    split = table["splits"]["last-10pct"]
    methods = split["methods"]
    assert set(methods) == {"two_tower"} | BASELINES
    for figures in methods.values():
        low, high = figures["recall@50_ci95"]
        assert 0 <= low <= figures["recall@50"] <= high <= 1
        assert 0 <= figures["pooled_recall@50"] <= 1
    # Two seeds trained (and timed); the ratios are to the best baseline of the same run.
    assert (
        len(split["two_tower_train_seconds"]) == 2 and "recall@50_seed_std" in methods["two_tower"]
    )
    best = max(methods[name]["recall@50"] for name in BASELINES)
    assert split["two_tower_vs_best_baseline_recall@50"] == pytest.approx(
        methods["two_tower"]["recall@50"] / best
    )
    # Each seed's validation figures (chosen prior included) are reported beside the test's.
    for figures in split["two_tower_validation"]:
        assert 0 <= figures["recall@50"] <= 1 and 0 <= figures["pooled_recall@50"] <= 1
    assert len(split["two_tower_prior_weight_and_half_life"]) == 2
    # On planted structure the model learns something real: well above most-popular.
    assert methods["two_tower"]["recall@50"] > methods["most_popular"]["recall@50"]


def test_absent_data_says_so_and_measures_nothing(tmp_path: Path) -> None:
    done = run("--data", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert "absent: nothing measured" in done.stderr and done.stdout == ""

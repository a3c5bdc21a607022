"""The quality benchmark end to end on small data (ML-1M is not in CI): the real trainer,
baselines and evaluation, through the script's command line only."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"
BASELINES = {"most_popular", "itemcf", "itemcf_iuf", "ease"}
SPLITS = ["leave-last-n:1", "last-10pct", "seed-2003"]
METRICS = {"recall@10", "recall@50", "ndcg@10", "ndcg@50", "pooled_recall@50"}
# One epoch, no prior search (through --train-args): the benchmark's code, not the model's
# quality, is what these tests check.
TINY = ("--seeds", "0,1", "--epochs", "1", "--batch-size", "256")
TINY_TRAINER = "--popularity-prior 0"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env
    )


def interval_holds(figures: dict, metric: str) -> bool:
    low, high = figures["ci95"][metric]
    return 0 <= low <= figures["means"][metric] <= high <= 1


@pytest.mark.slow
def test_every_split_method_metric_interval_ratio_and_target(tmp_path: Path) -> None:
    out, markdown = tmp_path / "quality.json", tmp_path / "quality.md"
    measured = ["--data", "synthetic:seed=1,users=200,items=150,per_user=30", *TINY]
    measured += ["--train-args", TINY_TRAINER]
    done = run(*measured, "--json", str(out), f"--markdown={markdown}")
    assert done.returncode == 0, done.stderr
    table = json.loads(out.read_text())
    assert json.loads(done.stdout) == table
    # The default splits, next-item first; the trainer options recorded.
    assert list(table["splits"]) == SPLITS
    assert table["seeds"] == [0, 1]
    assert table["trainer"]["train_args"] == TINY_TRAINER
    # The command that measures the same figures: where the output went is not part of it.
    assert table["command"] == shlex.join(["python", "benchmarks/quality.py", *measured])
    assert table["trainer"]["options"] == {"epochs": 1, "batch_size": 256, "popularity_prior": 0}
    # Each split's config: the options given over its protocol's default user tower.
    configs = {spec: split["trainer_config"] for spec, split in table["splits"].items()}
    towers = {spec: config["tower"]["user_tower"] for spec, config in configs.items()}
    assert towers == {"leave-last-n:1": "sequence", "last-10pct": "fields", "seed-2003": "fields"}
    for config in configs.values():
        assert (config["popularity_prior"], config["epochs"], config["batch_size"]) == (0, 1, 256)
    for split in table["splits"].values():
        assert split["applicable"] and split["protocol"]["name"]
        methods = split["methods"]
        assert set(methods) == {"two_tower"} | BASELINES
        for figures in methods.values():
            assert set(figures["ci95"]) == set(figures["means"]) >= METRICS
            assert all(interval_holds(figures, m) for m in METRICS)
        ours = methods["two_tower"]
        for metric in METRICS:
            low, high = ours["seed_range"][metric]
            assert low <= ours["means"][metric] <= high
        # Two seeds trained and timed; the two-tower's figures are their mean.
        runs = split["two_tower_runs"]
        assert [r["seed"] for r in runs] == [0, 1]
        assert ours["means"]["recall@10"] == pytest.approx(
            sum(r["test"]["recall@10"] for r in runs) / 2
        )
        training = split["training"]
        assert training["seconds"] == [r["seconds"] for r in runs]
        assert training["limit_seconds"] == 1800 and training["pass"] is True
        assert training["runs_at_once"] == 1
        # Informative ratios on every split, against EASE and the best baseline per metric.
        for metric, ratio in split["ratios"]["vs_best_baseline"].items():
            best = max(BASELINES, key=lambda b: methods[b]["means"][metric])
            assert ratio["baseline"] == best
            assert ratio["ratio"] == pytest.approx(
                ours["means"][metric] / methods[best]["means"][metric]
            )
        ease = split["ratios"]["vs_ease"]["recall@10"]["ratio"]
        assert ease == pytest.approx(
            ours["means"]["recall@10"] / methods["ease"]["means"]["recall@10"]
        )
        checks = [c["pass"] for c in split["targets"]] + [training["pass"]]
        assert split["pass"] is all(checks)
    # The targets: against EASE on next-item, against the best baseline on last-10pct.
    targets = {s: split["targets"] for s, split in table["splits"].items()}
    assert [(t["metric"], t["baseline"], t["target"]) for t in targets["leave-last-n:1"]] == [
        ("recall@10", "ease", 2.5),
        ("ndcg@10", "ease", 2.5),
    ]
    assert [(t["metric"], t["against"], t["target"]) for t in targets["last-10pct"]] == [
        ("recall@10", "best baseline", 1.15),
        ("recall@50", "best baseline", 1.0),
        ("pooled_recall@50", "best baseline", 1.0),
    ]
    assert targets["seed-2003"] == []
    for target in targets["leave-last-n:1"] + targets["last-10pct"]:
        assert target["pass"] is (target["ratio"] >= target["target"])
    assert table["pass"] is all(split["pass"] for split in table["splits"].values())
    # Published full-ML-1M figures beside the next-item split only.
    next_item = table["splits"]["leave-last-n:1"]
    assert [r["hit_rate@10"] for r in next_item["published_references"]] == [
        [0.285, 0.285],
        [0.30, 0.315],
    ]
    assert "published_references" not in table["splits"]["last-10pct"]
    # The markdown: the protocols named, the published references named as such.
    text = markdown.read_text()
    assert text.strip() in done.stderr
    assert "the literature's protocol for sequential models" in text
    assert "closest to production" in text
    assert "published, full ML-1M: SASRec" in text and "Kang & McAuley 2018" in text
    assert "Petrov & Macdonald 2023; Klenitskiy & Vasilev 2023" in text
    assert "not comparable one-to-one" in text
    for name in SPLITS:
        assert f"### `{name}`" in text
    # On planted structure the model learns something real: above most-popular.
    last = table["splits"]["last-10pct"]["methods"]
    assert last["two_tower"]["means"]["recall@50"] > last["most_popular"]["means"]["recall@50"]


def write_csv_log(directory: Path) -> Path:
    """60 users, 12 interactions each, all in 2002: no `seed-2003` test period."""
    directory.mkdir()
    rows = ["user,item,ts"]
    for user in range(60):
        start = 1009843200 + user * 3600  # 2002-01-01 on
        rows += [f"u{user},i{(user * 7 + j * 3) % 40},{start + j * 86400}" for j in range(12)]
    (directory / "log.csv").write_text("\n".join(rows) + "\n")
    columns = {"user_id": "user", "item_id": "item", "timestamp": "ts"}
    schema = {"interactions": {"file": "log.csv", **columns}}
    (directory / "schema.json").write_text(json.dumps(schema))
    return directory


@pytest.mark.slow
def test_a_split_the_data_cannot_make_is_reported_not_applicable(tmp_path: Path) -> None:
    data = write_csv_log(tmp_path / "log")
    out, markdown = tmp_path / "quality.json", tmp_path / "quality.md"
    done = run(
        *("--data", str(data), "--source", "csv", "--splits", "seed-2003,leave-last-n:1"),
        *("--seeds", "0", "--epochs", "1", "--train-args", TINY_TRAINER),
        *("--json", str(out), "--markdown", str(markdown)),
    )
    assert done.returncode == 0, done.stderr
    table = json.loads(out.read_text())
    skipped = table["splits"]["seed-2003"]
    assert skipped["applicable"] is False and "0 test interactions" in skipped["reason"]
    assert table["splits"]["leave-last-n:1"]["applicable"] is True
    summary = markdown.read_text().partition("### ")[0]
    assert "| `seed-2003` |" in summary and "not applicable: seed-2003: cut at" in summary
    # The table renders again from saved JSON alone (several runs' as one: here the same run).
    rendered = run("--render", str(out), str(out))
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout == markdown.read_text()


@pytest.mark.slow
def test_seeds_trained_in_parallel_processes_give_what_one_process_gives(tmp_path: Path) -> None:
    common = ("--data", "synthetic:seed=1,users=200,items=150,per_user=30", *TINY)
    common += ("--splits", "leave-last-n:1", "--train-args", TINY_TRAINER)
    tables = []
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}.json"
        done = run(*common, "--jobs", jobs, "--json", str(out))
        assert done.returncode == 0, done.stderr
        tables.append(json.loads(out.read_text()))
    one, two = (t["splits"]["leave-last-n:1"] for t in tables)
    assert [r["seed"] for r in two["two_tower_runs"]] == [0, 1]
    assert [r["test"] for r in two["two_tower_runs"]] == [r["test"] for r in one["two_tower_runs"]]
    for name, figures in two["methods"].items():  # all but the baselines' fit times
        assert figures["means"] == one["methods"][name]["means"]
    assert tables[1]["machine"]["jobs"] == 2
    assert tables[1]["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    # Two runs shared the cores: timed, but not judged against the one-run budget.
    assert two["training"]["runs_at_once"] == 2 and two["training"]["pass"] is None
    assert one["training"]["pass"] is True
    rendered = run("--render", str(tmp_path / "jobs2.json"))
    assert rendered.returncode == 0, rendered.stderr
    assert "not judged (2 runs shared the cores)" in rendered.stdout


def test_no_applicable_split_measures_nothing_and_fails(tmp_path: Path) -> None:
    data = write_csv_log(tmp_path / "log")
    done = run("--data", str(data), "--source", "csv", "--splits", "seed-2003")
    assert done.returncode == 1
    assert json.loads(done.stdout)["splits"]["seed-2003"]["applicable"] is False
    assert "no split applies to this data: nothing measured" in done.stderr


def test_runs_with_other_settings_do_not_render_as_one_table(tmp_path: Path) -> None:
    paths = []
    for seeds in ([0, 1, 2], [0]):
        table = {"data": {"source": "x"}, "seeds": seeds, "trainer": {"options": {}}, "splits": {}}
        paths.append(tmp_path / f"{len(seeds)}.json")
        paths[-1].write_text(json.dumps(table | {"command": "c", "commit": None}))
    done = run("--render", *map(str, paths))
    assert done.returncode == 2 and "the runs differ in seeds: not one table" in done.stderr


def test_absent_data_says_so_and_measures_nothing(tmp_path: Path) -> None:
    done = run("--data", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert "absent: nothing measured" in done.stderr and done.stdout == ""


def test_data_directory_without_the_files_says_which(tmp_path: Path) -> None:
    done = run("--data", str(tmp_path))
    assert done.returncode == 2
    assert f"missing file: {tmp_path / 'ratings.dat'}" in done.stderr and done.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--splits", "last-5pct"], "unknown split 'last-5pct'"),
        (["--train-args", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["--train-args", "--seed 3"], "each run's seed comes from --seeds"),
    ],
)
def test_bad_options_are_refused_before_any_work(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = run("--data", str(tmp_path / "missing"), *args)
    assert done.returncode == 2 and message in done.stderr and done.stdout == ""


CAP_SCRIPT = SCRIPT.parent / "history_cap.py"
CAP_DATA = "synthetic:seed=1,users=200,items=150,per_user=30"


def train_next_item_bundle(out: Path, seed: str, *options: str) -> Path:
    """A sequential-tower bundle (8 history items) trained by the real CLI on the next-item
    split of `CAP_DATA`."""
    command = [
        sys.executable, "-m", "models", "train", "--data", CAP_DATA,
        "--split", "leave-last-n:1", "--seed", seed, "--out", str(out),
        "--epochs", "1", "--batch-size", "64", "--history-length", "8",
        "--popularity-prior", "0", "--validation-fraction", "0", *options,
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def next_item_bundles(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two sequential-tower bundles, seeds 0 and 1 (`train_next_item_bundle`)."""
    root = tmp_path_factory.mktemp("caps")
    return [train_next_item_bundle(root / seed, seed) for seed in ("0", "1")]


def run_caps(*args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(CAP_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


@pytest.mark.slow
def test_history_caps_score_each_read_as_the_service_would(
    next_item_bundles: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "caps.json"
    done = run_caps(
        *("--data", CAP_DATA, "--split", "leave-last-n:1", "--caps", "8,3,1"),
        *("--bundles", *map(str, next_item_bundles), "--json", str(out)),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert json.loads(done.stdout) == report
    assert report["tower_reads"] == 8
    rows = report["caps"]
    assert list(rows) == ["full", "8", "3", "1"]
    assert [row["reads"] for row in rows.values()] == [8, 8, 3, 1]
    # The full read is what the trainer measured on the same bundles, averaged over seeds.
    trained = [
        json.loads((b / "manifest.json").read_text())["evaluation"]["results"]["two_tower"]
        for b in next_item_bundles
    ]
    for metric in ("hit_rate@10", "ndcg@10", "recall@50"):
        assert rows["full"]["means"][metric] == pytest.approx(
            sum(t[metric] for t in trained) / len(trained)
        )
        low, high = rows["full"]["seed_range"][metric]
        assert low == min(t[metric] for t in trained) and high == max(t[metric] for t in trained)
        for row in rows.values():
            assert interval_holds(row, metric)
    # A cap at the tower's own length reads what it reads; a shorter one reads less.
    assert rows["8"]["means"] == rows["full"]["means"]
    assert rows["full"]["vs_full"] == {m: 1.0 for m in rows["full"]["vs_full"]}
    assert rows["1"]["means"] != rows["full"]["means"]
    ease = report["ease"]["means"]["hit_rate@10"]
    assert rows["3"]["vs_ease"]["hit_rate@10"] == pytest.approx(
        rows["3"]["means"]["hit_rate@10"] / ease
    )
    # The service excludes the items it stores: all of them under the default HISTORY_CAP
    # (200, longer than any synthetic history here), and with one stored, older seen items
    # come back.
    assert rows["full"]["served_exclusion"]["means"] == rows["full"]["means"]
    assert rows["1"]["served_exclusion"]["means"] != rows["1"]["means"]
    assert interval_holds(rows["1"]["served_exclusion"], "ndcg@10")
    table = done.stderr.splitlines()
    assert sum(line.startswith("| ") for line in table) == 1 + 4  # the header and four caps


@pytest.mark.slow
def test_history_caps_refuse_a_bundle_of_another_split(
    next_item_bundles: list[Path],
) -> None:
    done = run_caps(
        *("--data", CAP_DATA, "--split", "last-10pct"),
        *("--bundles", str(next_item_bundles[0])),
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: the bundle was trained on split 'leave-last-n:1'")
    assert done.stdout == ""


@pytest.mark.slow
def test_a_bundle_trained_to_serve_fewer_items_scores_as_the_full_one_capped(
    next_item_bundles: list[Path], tmp_path: Path
) -> None:
    """`train --serve-history-length 3` exports the tower `HISTORY_CAP=3` would serve of the
    same training, and its own evaluation is what the cap measured of the full bundle."""
    served = train_next_item_bundle(tmp_path / "served", "0", "--serve-history-length", "3")
    out = tmp_path / "caps.json"
    done = run_caps(
        *("--data", CAP_DATA, "--split", "leave-last-n:1", "--caps", "3"),
        *("--bundles", str(next_item_bundles[0]), "--json", str(out)),
    )
    assert done.returncode == 0, done.stderr
    capped = json.loads(out.read_text())["caps"]["3"]["means"]
    manifest = json.loads((served / "manifest.json").read_text())
    assert manifest["training"]["serve_history_length"] == 3
    own = manifest["evaluation"]["results"]["two_tower"]
    for metric in ("hit_rate@10", "ndcg@10", "recall@50"):
        assert own[metric] == pytest.approx(capped[metric])
    spec = json.loads((served / "feature_spec.json").read_text())
    assert [f["length"] for f in spec["features"] if f["kind"] == "history"] == [3]

"""`python -m models ...` as a user runs it: real subprocesses, tiny synthetic data."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import safetensors
import safetensors.torch
from helpers_app import Reference
from redis import Redis
from trainer_helpers import SMALL_SOURCE, stored_json, stored_list

from harness.procs import RedisServer
from models import bundle as b
from models.cli import check_trained_on, main, parser, train_config
from models.dataset import DataError
from models.sources import load_dataset
from models.splits import make_split
from models.tower_config import HistoryEncoderName, TowerConfig
from models.towers import HISTORY_ENCODERS
from models.train_config import PRESETS, TrainConfig

FAST = [
    "--epochs", "1", "--batch-size", "256", "--history-length", "20",
    "--field-dim", "16", "--hidden", "64", "--out-dim", "32", "--validation-fraction", "0",
]  # fmt: skip
METRICS = {f"{m}@{k}" for m in ("recall", "hit_rate", "ndcg") for k in (10, 20, 50, 100)}


def models_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # tiny models; threads only contend
    return subprocess.run(
        [sys.executable, "-m", "models", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def printed_table(stderr: str) -> dict[str, dict[str, list[float]]]:
    """The evaluation table at the end of `stderr`: `{method: {metric: [mean, low, high]}}`."""
    lines = stderr.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("method "))
    family = {"R": "recall", "HR": "hit_rate", "NDCG": "ndcg"}
    metrics = [
        f"{family[short]}@{k}"
        for short, _, k in (h.partition("@") for h in lines[start].split()[1:])
    ]
    table: dict[str, dict[str, list[float]]] = {}
    rows = lines[start + 1 :]
    assert len(rows) % 3 == 0, rows
    for mean_row, low_row, high_row in zip(rows[::3], rows[1::3], rows[2::3], strict=True):
        name, *means = mean_row.split()
        assert low_row.split()[:2] == ["ci95", "low"] and high_row.split()[:2] == ["ci95", "high"]
        cells = zip(means, low_row.split()[2:], high_row.split()[2:], strict=True)
        table[name] = {m: [float(c) for c in cell] for m, cell in zip(metrics, cells, strict=True)}
    return table


def assert_table_matches_report(table: dict[str, dict[str, list[float]]], report: dict) -> None:
    """Every printed mean carries its interval, low <= mean <= high, as in the JSON report."""
    assert list(table) == list(report["results"]) == list(report["ci95"])
    for name, printed in table.items():
        assert set(printed) == set(report["results"][name]) == set(report["ci95"][name]) == METRICS
        for metric, (mean, low, high) in printed.items():
            json_low, json_high = report["ci95"][name][metric]
            assert json_low <= report["results"][name][metric] <= json_high, (name, metric)
            assert [mean, low, high] == [
                round(v, 4) for v in (report["results"][name][metric], json_low, json_high)
            ]
            assert low <= mean <= high


@pytest.fixture(scope="module")
def training(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """(artifacts directory, the finished `train` process)."""
    out = tmp_path_factory.mktemp("cli") / "artifacts"
    done = models_cli("train", "--data", SMALL_SOURCE, "--out", str(out), "--seed", "3", *FAST)
    assert done.returncode == 0, done.stderr
    return out, done


@pytest.fixture(scope="module")
def trained(training: tuple[Path, subprocess.CompletedProcess[str]]) -> tuple[Path, Path]:
    """(artifacts directory, bundle path printed by `train`)."""
    out, done = training
    return out, Path(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_prints_a_verified_bundle_path(trained: tuple[Path, Path]) -> None:
    out, bundle = trained
    assert bundle.parent == out
    assert b.read_latest(out) == bundle.name
    verified = b.verify_bundle(bundle)
    assert verified.manifest["training"]["seed"] == 3
    assert verified.manifest["training"]["epochs"] == 1
    assert verified.manifest["data"]["source"] == SMALL_SOURCE
    assert verified.manifest["data"]["split"] == "last-10pct"
    assert set(verified.manifest["evaluation"]["results"]["two_tower"]) == METRICS


@pytest.mark.slow
def test_train_prints_every_metric_with_its_interval(
    training: tuple[Path, subprocess.CompletedProcess[str]], trained: tuple[Path, Path]
) -> None:
    _, done = training
    report = b.verify_bundle(trained[1]).manifest["evaluation"]
    assert_table_matches_report(printed_table(done.stderr), report)


@pytest.mark.slow
def test_evaluate_writes_the_design_json(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, bundle = trained
    report_path = tmp_path / "report.json"
    done = models_cli(
        "evaluate", "--data", SMALL_SOURCE, "--split", "last-10pct",
        "--bundle", str(bundle), "--baselines", "--json", str(report_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    assert set(report) == {"split", "n_test_users", "n_test_interactions", "results", "ci95"}
    assert report["split"] == "last-10pct"
    manifest = b.verify_bundle(bundle).manifest
    assert report["n_test_users"] == manifest["data"]["n_test_users"]
    assert report["n_test_interactions"] == manifest["data"]["n_test_interactions"]
    assert set(report["results"]) >= {"two_tower", "most_popular", "itemcf", "ease"}
    for name, metrics in report["results"].items():
        assert set(metrics) == METRICS, name
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    # The exported bundle, read back through raw features, scores as the trainer measured.
    assert report["results"]["two_tower"] == manifest["evaluation"]["results"]["two_tower"]
    assert "two_tower" in done.stderr and "recall" not in done.stdout
    # Every printed metric of every method with its 95 % interval, in the table and the JSON;
    # the same resamples of the same users as in the training process.
    assert_table_matches_report(printed_table(done.stderr), report)
    assert report["ci95"]["two_tower"] == manifest["evaluation"]["ci95"]["two_tower"]


@pytest.mark.slow
def test_evaluate_intervals_are_reproducible(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, bundle = trained
    runs = []
    for name in ("first.json", "second.json"):
        args = ["evaluate", "--data", SMALL_SOURCE, "--split", "last-10pct"]
        assert main([*args, "--bundle", str(bundle), "--json", str(tmp_path / name)]) == 0
        runs.append(((tmp_path / name).read_text(), capsys.readouterr().err))
    (first_json, first_table), (second_json, second_table) = runs
    assert first_json == second_json and first_table == second_table
    report = json.loads(first_json)
    assert_table_matches_report(printed_table(first_table), report)
    low, high = report["ci95"]["two_tower"]["recall@50"]
    assert low < report["results"]["two_tower"]["recall@50"] < high


@pytest.mark.slow
def test_evaluate_reads_the_history_a_capped_service_reads(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--history-cap N` scores the bundle with each user's newest N items, as the service
    under HISTORY_CAP=N serves it; a cap at the tower's own length changes nothing."""
    _, bundle = trained  # a tower reading 20 items
    args = ["evaluate", "--data", SMALL_SOURCE, "--split", "last-10pct", "--bundle", str(bundle)]
    reports = {}
    for cap in (None, 20, 1):
        path = tmp_path / f"cap-{cap}.json"
        given = [] if cap is None else ["--history-cap", str(cap)]
        assert main([*args, *given, "--json", str(path)]) == 0
        reports[cap] = json.loads(path.read_text())
    capsys.readouterr()
    assert "history_cap" not in reports[None]
    assert reports[20]["history_cap"] == 20 and reports[1]["history_cap"] == 1
    assert reports[20]["results"] == reports[None]["results"]
    assert reports[1]["results"]["two_tower"] != reports[None]["results"]["two_tower"]
    assert reports[1]["n_test_users"] == reports[None]["n_test_users"]
    with pytest.raises(SystemExit) as refused:
        main([*args, "--history-cap", "0"])
    assert refused.value.code == 2
    assert "--history-cap: 0: expected an integer >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_refuses_a_split_the_bundle_was_not_trained_on(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, bundle = trained
    args = ["evaluate", "--data", SMALL_SOURCE, "--split", "leave-last-n:1"]
    args += ["--bundle", str(bundle)]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: the bundle was trained on split 'last-10pct' of ")
    assert "(`evaluate --any-split` scores it anyway)" in error
    # Asked for explicitly, it is measured anyway.
    assert main([*args, "--any-split"]) == 0


@pytest.mark.slow
def test_evaluate_finds_nothing_with_a_bundle_of_another_catalogue(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    """The bundle scores -inf every item it does not have; ranked among the ties, the
    relevant ones counted as found (recall@10 0.42 for a bundle sharing no item)."""
    _, bundle = trained
    data = tmp_path / "other"
    data.mkdir()
    (data / "schema.json").write_text(json.dumps({"interactions": {"file": "i.csv"}}))
    rows = [f"u{u},x{(u + s) % 12},{1000 * s + u}" for u in range(40) for s in range(6)]
    (data / "i.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    report = tmp_path / "report.json"
    args = ["evaluate", "--data", f"csv:{data}", "--split", "last-10pct", "--any-split"]
    assert main([*args, "--bundle", str(bundle), "--json", str(report)]) == 0
    means = json.loads(report.read_text())["results"]["two_tower"]
    assert means and all(value == 0.0 for value in means.values()), means


@pytest.mark.slow
def test_evaluate_refuses_other_data_of_the_same_size(trained: tuple[Path, Path]) -> None:
    """Same split name, same number of training rows, other rows: only the fingerprint of
    the training part tells (a reviewer's time-reversed copy was measured as if unseen)."""
    _, bundle = trained
    manifest = b.verify_bundle(bundle).manifest
    split = make_split(load_dataset(SMALL_SOURCE).interactions, "last-10pct")
    check_trained_on(manifest, split)  # its own data: accepted
    other = split.train.assign(item_id=np.roll(split.train["item_id"].to_numpy(), 1))
    with pytest.raises(DataError, match="the training rows differ"):
        check_trained_on(manifest, replace(split, train=other))


@pytest.mark.slow
def test_bad_data_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "artifacts"
    done = models_cli("train", "--data", "nosuch:x", "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown data source 'nosuch:x'; valid forms: ")
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data", "synthetic:users=lots"], "synthetic"),
        (["train", "--data", "ml-1m:/nonexistent/ml-1m"], "is not a directory"),
        (
            ["evaluate", "--data", "csv:", "--split", "last-10pct", "--baselines"],
            "needs a directory",
        ),
        (["evaluate", "--data", "synthetic:users=40", "--split", "bogus", "--baselines"], "bogus"),
        (  # the split is refused before the data loads
            ["evaluate", "--data", "nosuch:x", "--split", "leave-last-n:0", "--baselines"],
            "unknown split 'leave-last-n:0'",
        ),
        (
            ["evaluate", "--data", "synthetic:users=40", "--split", "last-10pct"],
            "nothing to evaluate",
        ),
        (
            [
                "evaluate",
                "--data",
                "nosuch:x",  # refused before the data loads
                "--split",
                "last-10pct",
                "--bundle",
                "nope",
            ],
            "--bundle nope: no such bundle directory",
        ),
        (  # written into the report as if applied to the baselines
            [
                *("evaluate", "--data", "nosuch:x", "--split", "last-10pct", "--baselines"),
                *("--history-cap", "5"),
            ],
            "--history-cap and --any-split apply to a --bundle",
        ),
    ],
)
def test_bad_arguments_exit_2_in_process(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--epochs", "0"], "epochs must be at least 1"),
        (["--batch-size", "0"], "batch_size must be at least 1"),
        (["--temperature", "0"], "temperature must be > 0"),
        (["--num-negatives", "-3"], "num_negatives must be >= 0"),
        (["--popularity-prior", "nan"], "popularity_prior must be a finite number, got nan"),
        # inf passed every bound: the temperature's trained nothing and exported a bundle.
        (["--temperature", "inf"], "temperature must be a finite number, got inf"),
        (["--lr", "inf"], "lr must be a finite number"),
        (["--recency-half-life", "inf"], "recency_half_life_days must be a finite number"),
        (["--seed", "-1"], "seed must be in [0, 2**32), got -1"),
        (["--seed", str(2**32)], "seed must be in [0, 2**32)"),
        (["--device", "mps"], "device 'mps': the trainer runs on cpu or cuda[:N]"),
        # They changed the sequential tower's logQ for a draw it never makes.
        (["--split", "leave-last-n:1", "--user-balance", "1"], "user_balance applies to the field"),
        (["--user-tower", "sequence", "--target-window", "5"], "target_window applies to"),
        (["--device", "meta"], "device 'meta': the trainer runs on cpu or cuda[:N]"),
        (["--validation-fraction", "1"], "validation_fraction must be in [0, 1)"),
        (["--validation-min-gap", "-1"], "validation_min_gap_days must be >= 0"),
        (["--dropout", "1"], "dropout must be in [0, 1)"),
        (["--out-dim", "0"], "out_dim"),
        (["--loss", "bce", "--mask-seen-negatives"], "softmax' only"),
        (["--device", "bogus"], "device 'bogus'"),
        (["--split", "last-5pct"], "leave-last-n:N' (N >= 1), or 'none' (train on everything)"),
        (["--json", "/nonexistent-dir/report.json"], "no directory /nonexistent-dir"),
        # Both failed only after training and exporting.
        (["--json", "/tmp"], "--json /tmp is a directory"),
        (["--split", "none", "--baselines"], "--split none has none"),  # it was ignored
        (["--out", f"{__file__}/sub"], f"{__file__} exists and is not a directory"),
        # Every step's loss was 0: the exported bundle was the random initialisation.
        (["--batch-size", "1", "--user-tower", "fields"], "in-batch negatives need batch_size"),
        # The split's default tower refuses: the message said negatives 'all' needs softmax.
        (["--split", "leave-last-n:1", "--loss", "hinge"], "the sequential user tower trains"),
    ],
)
def test_bad_training_options_fail_before_any_work(
    option: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value that would crash (or quietly waste) a run is refused before the data loads."""
    out = tmp_path / "artifacts"
    assert main(["train", "--data", "nosuch:x", "--out", str(out), *FAST, *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "purpose"),
    [
        (["train", "--baselines"], "--baselines holds dense"),
        (["train", "--distill-weight", "0.1"], "distillation's EASE teacher holds dense"),
        (["evaluate", "--split", "last-10pct", "--baselines"], "--baselines holds dense"),
    ],
)
def test_dense_item_matrices_beyond_the_memory_fail_before_training(
    args: list[str],
    purpose: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("models.baselines._available_memory", lambda: 1024)  # 1 KiB left
    monkeypatch.setattr("models.pipeline.Trainer.fit", lambda _: pytest.fail("trained"))
    out = tmp_path / "artifacts"
    extra = ["--out", str(out), *FAST] if args[0] == "train" else []
    assert main([*args, "--data", "synthetic:users=40,items=30", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and purpose in err, err
    assert not out.exists()


def test_a_training_part_too_short_to_validate_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two interactions a user: the test split takes each user's last, and the validation
    slice would take the one left. The error said "no user has more than 1 interactions"
    of data where every user has 2."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "schema.json").write_text(json.dumps({"interactions": {"file": "i.csv"}}))
    rows = [f"u{k},i{k % 7},{1000 + k}\nu{k},i{(k + 3) % 7},{2000 + k}" for k in range(30)]
    (data / "i.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    out = tmp_path / "artifacts"
    args = ["train", "--data", f"csv:{data}", "--split", "leave-last-n:1", "--out", str(out)]
    args += ["--user-tower", "fields", *FAST[: FAST.index("--validation-fraction")]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no validation slice in the training part (") and (
        "--validation-fraction 0 trains without one" in err
    ), err
    assert main([*args, "--validation-fraction", "0"]) == 0  # as the error says


def test_a_test_part_with_nothing_to_measure_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every user's last item repeats one seen before: after training, every metric would
    read 0.0 and the run would be lost."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "schema.json").write_text(json.dumps({"interactions": {"file": "i.csv"}}))
    rows = [f"u{u},i{i},{10 * u + t}" for u in range(20) for t, i in enumerate([1, 2, 3, 1])]
    (tmp_path / "data" / "i.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows))
    monkeypatch.setattr("models.pipeline.Trainer.fit", lambda _: pytest.fail("trained"))
    out = tmp_path / "artifacts"
    data = f"csv:{tmp_path / 'data'}"
    assert (
        main(["train", "--data", data, "--split", "leave-last-n:1", "--out", str(out), *FAST]) == 2
    )
    assert "the test part has no user with an item not seen in training" in capsys.readouterr().err
    assert not out.exists()


def test_an_out_path_that_is_a_file_fails_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "artifacts"
    out.write_text("")
    assert main(["train", "--data", "nosuch:x", "--out", str(out), *FAST]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_every_config_field_is_an_option_with_its_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for config in (TrainConfig, TowerConfig):
        for f in dataclasses.fields(config):
            if f.name == "tower":  # the architecture group: TowerConfig's own fields
                continue
            flag = "--" + (f.metadata["flag"] or f.name).replace("_", "-")
            assert flag in help_text, flag
            assert " ".join(f.metadata["help"].split()[:6]) in help_text, f.name
    assert set(HISTORY_ENCODERS) == set(get_args(HistoryEncoderName))


def test_the_sequence_tower_brings_its_own_defaults_and_given_options_win() -> None:
    base = ["train", "--data", "synthetic", "--user-tower", "sequence"]
    config = train_config(parser().parse_args(base))
    expected = TrainConfig.create(**{"tower.user_tower": "sequence"})
    assert config == expected
    for path, value in PRESETS["sequence"].items():
        owner = config.tower if path.startswith("tower.") else config
        assert getattr(owner, path.removeprefix("tower.")) == value, path
    assert (config.negatives, config.batch_size, config.tower.field_dim) == ("all", 64, 64)
    given = train_config(
        parser().parse_args([*base, "--batch-size", "32", "--refit", "--field-dim", "16"])
    )
    assert (given.batch_size, given.refit, given.tower.field_dim) == (32, True, 16)
    assert given.history_length == 200  # the preset still fills what was not given
    fields = train_config(parser().parse_args(["train", "--data", "synthetic"]))
    assert fields == TrainConfig() and fields.batch_size == 512


def test_the_sequence_tower_serves_its_newest_50_items_within_any_window() -> None:
    """The preset trains on 200 items and serves the newest 50; a shorter window given is
    served whole, and a read given (0: the whole window) wins."""

    def config(*extra: str) -> TrainConfig:
        base = ["train", "--data", "synthetic", "--user-tower", "sequence", *extra]
        return train_config(parser().parse_args(base))

    assert (config().history_length, config().serve_history_length) == (200, 50)
    assert config("--history-length", "8").serve_history_length == 8
    assert config("--history-length", "80").serve_history_length == 50
    assert config("--serve-history-length", "0").serve_history_length == 0
    assert config("--serve-history-length", "120").serve_history_length == 120
    with pytest.raises(ValueError, match="at most history_length"):
        config("--history-length", "8", "--serve-history-length", "50")


def test_the_default_user_tower_follows_the_splits_protocol() -> None:
    def config(*extra: str) -> TrainConfig:
        return train_config(parser().parse_args(["train", "--data", "synthetic", *extra]))

    # Next-item: the sequential tower with its own defaults; a time split or none: fields.
    assert config("--split", "leave-last-n:1") == TrainConfig.create(
        **{"tower.user_tower": "sequence"}
    )
    assert config("--split", "leave-last-n:2").history_length == 200
    for split in ("last-10pct", "seed-2003", "none"):
        assert config("--split", split) == TrainConfig()
    # A tower asked for wins, with its own defaults.
    assert config("--split", "leave-last-n:1", "--user-tower", "fields") == TrainConfig()
    chosen = config("--split", "none", "--user-tower", "sequence")
    assert chosen.tower.user_tower == "sequence" and chosen.negatives == "all"


def test_a_bad_option_value_is_a_clear_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(["train", "--data", "synthetic", "--hidden", "64,x"])
    assert exited.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--data", "synthetic", "--validation-metric", "auc"])
    assert "invalid choice" in capsys.readouterr().err


def test_options_map_onto_the_config() -> None:
    args = parser().parse_args(
        [
            *("train", "--data", "synthetic", "--seed", "11", "--epochs", "4"),
            *("--loss", "bce", "--negatives", "mixed", "--num-negatives", "5", "--no-logq"),
            *("--hidden", "64,32", "--senet", "--history-encoder", "attention", "--device", "cpu"),
        ]
    )
    config = train_config(args)
    assert (config.seed, config.loss, config.negatives, config.num_negatives) == (
        11,
        "bce",
        "mixed",
        5,
    )
    assert config.logq_correction is False and config.epochs == 4 and config.device == "cpu"
    assert config.tower.hidden == (64, 32) and config.tower.senet
    assert config.tower.history_encoder == "attention"
    defaults = train_config(parser().parse_args(["train", "--data", "synthetic"]))
    assert defaults.device == "auto" and defaults.logq_correction and defaults.loss == "softmax"
    # Every option of the trainer's config is reachable from the command line, defaults intact.
    assert defaults == TrainConfig()
    quality = [
        *("train", "--data", "synthetic", "--history-mode", "before", "--history-dropout", "0.2"),
        *("--no-mask-seen-negatives", "--prior-half-life", "30", "--negatives", "all"),
    ]
    config = train_config(parser().parse_args(quality))
    assert (config.history_mode, config.history_dropout) == ("before", 0.2)
    assert not config.mask_seen_negatives and config.prior_half_life_days == 30.0
    assert config.negatives == "all"
    more = [
        *("train", "--data", "synthetic", "--validation-min-gap", "3.5"),
        *("--validation-metric", "pooled_recall@50", "--user-balance", "0.5"),
        *("--recency-half-life", "45"),
        *("--distill-weight", "0.7", "--distill-temperature", "1.5", "--distill-top-k", "20"),
    ]
    config = train_config(parser().parse_args(more))
    assert config.validation_min_gap_days == 3.5 and config.recency_half_life_days == 45.0
    assert config.validation_metric == "pooled_recall@50" and config.user_balance == 0.5
    assert (config.distill_weight, config.distill_temperature, config.distill_top_k) == (
        0.7,
        1.5,
        20,
    )


@pytest.fixture
def store(redis_client: Redis, redis_prefix: str) -> tuple[Redis, str]:
    """A real Redis (conftest: the local one, or a redis-server of the tests' own) and a key
    prefix of this test alone (deleted afterwards)."""
    return redis_client, redis_prefix


@pytest.mark.slow
def test_publish_features_writes_the_service_layout(
    store: tuple[Redis, str], redis_url: str
) -> None:
    client, prefix = store
    source = "synthetic:seed=4,users=30,items=40"
    done = models_cli(
        "publish-features", "--data", source, "--redis-url", redis_url,
        "--prefix", prefix, "--history-length", "5",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"published features and histories of 30 users to {redis_url}"
    dataset = load_dataset(source)
    newest_first = dataset.interactions.sort_values("timestamp", kind="stable").iloc[::-1]
    keys = {str(k) for k in client.scan_iter(match=f"{prefix}:*")}
    assert len(keys) == 60
    for user_id, row in dataset.users.iterrows():
        # The layout of the Redis contract: the user id as the keys' hash tag.
        stored = stored_json(client, f"{prefix}:user:{{{user_id}}}")
        assert stored == {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        history = stored_list(client, f"{prefix}:hist:{{{user_id}}}")
        mine = newest_first.loc[newest_first["user_id"] == user_id, "item_id"].tolist()
        assert history == mine[:5] and len(history) == min(5, len(mine))


def test_publish_features_stores_the_features_of_users_without_interactions(
    tmp_path: Path, store: tuple[Redis, str], redis_url: str
) -> None:
    """A users table's users who never interacted are who the two-tower serves by their own
    attributes (cold start): they were dropped with the training data and served defaults."""
    client, prefix = store
    data = tmp_path / "data"
    data.mkdir()
    (data / "i.csv").write_text("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,2\n")
    (data / "u.csv").write_text("user_id,country,age\nu1,DE,31\nnew,FR,24\nbare,,\n")
    columns = {"country": {"kind": "categorical"}, "age": {"kind": "numeric"}}
    schema = {"interactions": {"file": "i.csv"}, "users": {"file": "u.csv", "columns": columns}}
    (data / "schema.json").write_text(json.dumps(schema))
    done = models_cli("publish-features", "--data", f"csv:{data}", "--redis-url", redis_url,
                      "--prefix", prefix)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "features and histories of 3 users" in done.stdout
    assert stored_json(client, f"{prefix}:user:{{u1}}") == {"country": "DE", "age": 31.0}
    assert stored_list(client, f"{prefix}:hist:{{u1}}") == ["i2", "i1"]
    assert stored_json(client, f"{prefix}:user:{{new}}") == {"country": "FR", "age": 24.0}
    assert stored_json(client, f"{prefix}:user:{{bare}}") == {}
    assert not client.exists(f"{prefix}:hist:{{new}}", f"{prefix}:hist:{{bare}}")


@pytest.mark.parametrize(
    ("option", "value"),
    [("--history-length", "0"), ("--history-length", "-5"), ("--ttl", "0"), ("--ttl", "-5")],
)
def test_publish_features_refuses_a_history_length_or_ttl_below_one(
    option: str,
    value: str,
    store: tuple[Redis, str],
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A history length of 0 would publish no histories, and -5 every item but the oldest
    five; a TTL of -5 published keys that never expire, and 0 is no TTL Redis takes: all are
    refused before anything is written, as HISTORY_CAP below 1 is."""
    client, prefix = store
    args = ["publish-features", "--data", "synthetic:users=20", "--redis-url", redis_url]
    with pytest.raises(SystemExit) as refused:
        main([*args, "--prefix", prefix, option, value])
    assert refused.value.code == 2
    assert f"{option}: {value}: expected an integer >= 1" in capsys.readouterr().err
    assert list(client.scan_iter(match=f"{prefix}:*")) == []


@pytest.mark.parametrize("tower", ["fields", "sequence"])
def test_attributes_named_as_torch_names_its_own_train_and_serve(
    tmp_path: Path, tower: str
) -> None:
    # A column named `type`, `items` or `float`, or holding a ".", crashed building the
    # towers: each feature's module was registered under the column's name.
    data = tmp_path / "data"
    data.mkdir()
    users = {"type": "categorical", "items": "multi_hot", "user.age": "numeric"}
    users |= {"~x": "categorical", "plan": "categorical"}
    schema = {
        "interactions": {"file": "i.csv"},
        "users": {"file": "u.csv", "columns": {name: {"kind": k} for name, k in users.items()}},
        "items": {"file": "m.csv", "columns": {"float": {"kind": "categorical"}}},
    }
    (data / "schema.json").write_text(json.dumps(schema))
    rows = [f"u{u},i{(u * 5 + t * 3) % 23},{1000 * u + t}" for u in range(60) for t in range(8)]
    (data / "i.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    (data / "u.csv").write_text(
        "user_id,type,items,user.age,~x,plan\n"
        + "".join(f"u{u},t{u % 3},a|b{u % 2},{20 + u % 40},x{u % 4},p{u % 2}\n" for u in range(60))
    )
    (data / "m.csv").write_text("item_id,float\n" + "".join(f"i{i},f{i % 2}\n" for i in range(23)))
    out = tmp_path / "artifacts"
    args = ["train", "--data", f"csv:{data}", "--split", "leave-last-n:1", "--out", str(out)]
    assert main([*args, "--user-tower", tower, *FAST]) == 0
    bundle = out / (out / "LATEST").read_text().strip()
    # The tower reads each of them: the user vector moves with each attribute alone.
    reference = Reference(bundle)
    base = {"type": "t1", "items": ["a", "b0"], "user.age": 30, "~x": "x1", "plan": "p0"}
    vector = reference.user_vector(base, ["i3", "i7"])
    changes = [("type", "t2"), ("items", ["b1"]), ("user.age", 55), ("~x", "x3"), ("plan", "p1")]
    for name, other in changes:
        moved = reference.user_vector(base | {name: other}, ["i3", "i7"])
        assert not np.allclose(vector, moved, atol=1e-6), name
    # The others are escaped; a name torch takes keeps its weights' name, as in earlier bundles.
    keys = safetensors.safe_open(str(bundle / b.TOWERS_WEIGHTS), "pt").keys()
    for module in ("~type", "~items", "~user~_age", "~~~x", "plan", "~float"):
        assert any(f".fields.{module}." in key for key in keys), module
    # Bundles written before names starting with "~" were escaped keyed `~x` as it was: such
    # a bundle still loads, and reads `~x` as it was trained to.
    earlier = Path(shutil.copytree(bundle, tmp_path / "earlier" / bundle.name))
    weights = safetensors.torch.load_file(earlier / b.TOWERS_WEIGHTS)
    renamed = {k.replace(".fields.~~~x.", ".fields.~x."): v for k, v in weights.items()}
    assert renamed.keys() != weights.keys()
    safetensors.torch.save_file(renamed, earlier / b.TOWERS_WEIGHTS)
    manifest = json.loads((earlier / b.MANIFEST).read_text())
    manifest["sha256"][b.TOWERS_WEIGHTS] = b.sha256_file(earlier / b.TOWERS_WEIGHTS)
    (earlier / b.MANIFEST).write_text(json.dumps(manifest))
    for features in (base, base | {"~x": "x3"}):
        np.testing.assert_array_equal(
            Reference(earlier).user_vector(features, ["i3", "i7"]),
            reference.user_vector(features, ["i3", "i7"]),
        )


def test_publish_features_names_a_refused_write_and_never_prints_the_password() -> None:
    # An out-of-memory refusal ended in a traceback (exit 1); the URL's password was printed
    # on success and in the "cannot reach" error.
    server = RedisServer().start()
    try:
        admin = Redis.from_url(server.url)
        admin.config_set("requirepass", "s3cret")
        admin = Redis.from_url(server.url, password="s3cret")
        url = f"redis://:s3cret@127.0.0.1:{server.port}/0"
        args = ("publish-features", "--data", SMALL_SOURCE, "--prefix", "pw")
        done = models_cli(*args, "--redis-url", url)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith(f"to redis://:***@127.0.0.1:{server.port}/0")
        wrong = models_cli(*args, "--redis-url", url.replace("s3cret", "wrong"))
        assert wrong.returncode == 2 and "wrong" not in wrong.stderr + wrong.stdout
        assert wrong.stderr.startswith("error: cannot reach Redis at redis://:***@127.0.0.1")
        admin.config_set("maxmemory", 1)
        refused = models_cli(*args, "--redis-url", url)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert refused.stderr.startswith("error: Redis refused a write (")
        assert "publish again once it accepts writes" in refused.stderr
        admin.close()
    finally:
        server.stop()

"""Seconds per training epoch of the trainer's defaults, on each device and precision asked for:
what a user with a GPU compares against the CPU (issue 19: >= 10x a 16-core CPU per epoch).

    python benchmarks/train_epoch.py                         # ML-1M half if present, CPU
    python benchmarks/train_epoch.py --runs cpu:fp32,cuda:fp32,cuda:bf16 --epochs 3 --json F
    python benchmarks/train_epoch.py --data synthetic:seed=0,users=3000,items=3700

Each run trains the defaults of `--split`'s protocol (the sequential tower on `leave-last-n:1`)
on that split's training part, without validation, for `--epochs` epochs, and reports each
epoch's seconds (the first includes warm-up: CUDA kernels, allocator) and the mean of the
others, and the mean training loss (bf16 against fp32: the same run in both arithmetics).
`--threads` sets torch's CPU threads (default: all cores). With no `--data`, the ML-1M half
under `../shared/data/ml-1m-half` is read when present, else a synthetic catalogue of its size
(said so in the JSON). JSON on stdout (and `--json`), progress on stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from models.dataset import DataError, Dataset
from models.sources import load_dataset
from models.splits import make_split
from models.train import Trainer
from models.train_config import TrainConfig
from models.trained import TrainedModel

ML_1M_HALF = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ml-1m-half"
# The synthetic stand-in when the real data is absent: ML-1M half's size.
SYNTHETIC = "synthetic:seed=0,users=3000,items=3700,per_user=160"


def epoch_seconds(
    dataset: Dataset, train: pd.DataFrame, config: TrainConfig
) -> tuple[list[float], list[float]]:
    """Train `config`'s epochs; each epoch's seconds and mean loss. The trainer calls its
    validation after each epoch: here that only reads the clock (once the GPU is done)."""
    device = config.resolved_device()
    marks: list[float] = []

    def clock(trained: TrainedModel) -> dict[str, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        # Never better than the first: the trainer copies the model's state once, after the
        # first epoch (counted in the second's time; ~1 MB on ML-1M), and never again.
        return {config.validation_metric: 0.0}

    trainer = Trainer(dataset, train, config, validate=clock)
    marks.append(time.perf_counter())
    history = trainer.fit().history
    seconds = [b - a for a, b in itertools.pairwise(marks)]
    return seconds, [record["loss"] for record in history]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", help=f"a --data source (default: ML-1M half, else {SYNTHETIC})")
    p.add_argument("--split", default="leave-last-n:1")
    p.add_argument("--runs", default="cpu:fp32", help="device:precision,... (e.g. cuda:bf16)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    source = args.data or (f"ml-1m:{ML_1M_HALF.resolve()}" if ML_1M_HALF.is_dir() else SYNTHETIC)
    if args.data is None and source == SYNTHETIC:
        print(f"ML-1M is not at {ML_1M_HALF.resolve()}: timing {SYNTHETIC}", file=sys.stderr)
    # Every run's options are checked before the first trains (a GPU missing, a typo).
    configs: dict[str, TrainConfig] = {}
    for run in args.runs.split(","):
        device, _, precision = run.partition(":")
        try:
            configs[run] = TrainConfig.create(
                args.split,
                epochs=args.epochs,
                patience=0,
                validation_fraction=0.0,
                refit=False,
                popularity_prior=0.0,
                seed=args.seed,
                device=device,
                precision=precision or "fp32",
            )
            configs[run].resolved_device()
        except ValueError as exc:
            p.error(f"--runs {run}: {exc}")
    torch.set_num_threads(args.threads)
    try:
        dataset = load_dataset(source)
        train = make_split(dataset.interactions, args.split).train
    except (DataError, ValueError) as exc:
        p.error(str(exc))
    report: dict[str, Any] = {
        "benchmark": "train_epoch",
        "data": source,
        "real_data": source.startswith("ml-"),
        "split": args.split,
        "threads": args.threads,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
        "runs": {},
    }
    for run, config in configs.items():
        seconds, losses = epoch_seconds(dataset, train, config)
        rest = seconds[1:] or seconds
        report["runs"][run] = {
            "user_tower": config.tower.user_tower,
            "epoch_s": [round(s, 3) for s in seconds],
            "mean_epoch_s_after_first": round(sum(rest) / len(rest), 3),
            "loss": [round(v, 4) for v in losses],
        }
        print(f"{run}: {report['runs'][run]}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

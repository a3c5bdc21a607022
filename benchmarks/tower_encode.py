"""In-process cost of encoding users with each user tower, as the service runs it (scripted,
one math thread), at batch 1 and batch 64, on histories of ML-1M-like lengths.

    python benchmarks/tower_encode.py                    # field tower, sequence L200 and L50
    python benchmarks/tower_encode.py --items 3700 --rounds 5 --json F

Prints JSON (and writes it to `--json`): per tower, milliseconds per call at batch 1 and per
user at batch 64. The towers are untrained (the cost does not depend on the weights); the
histories' lengths are log-normal around 100 items (ML-1M's users rate 20 to ~2,000 films).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.feature_spec import fit_feature
from models.features import FeatureEncoder
from models.towers import TowerConfig, TwoTower

TOWERS: dict[str, tuple[TowerConfig, int]] = {  # name -> (architecture, history length)
    "field tower (default), mean history, L100": (TowerConfig(), 100),
    "sequence tower, d64, 2 blocks, L200": (TowerConfig(user_tower="sequence", field_dim=64), 200),
    "sequence tower, d64, 2 blocks, L50": (TowerConfig(user_tower="sequence", field_dim=64), 50),
}


def measure(
    config: TowerConfig, length: int, items: int, rounds: int, seed: int
) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    catalogue = {str(i): i for i in range(items)}
    features = [fit_feature("country", "categorical", ["a", "b", "c"])]
    encoder = FeatureEncoder(features, length, catalogue)
    model = TwoTower(encoder, FeatureEncoder([]), items, config).eval()
    tower = torch.jit.script(model.user_tower)
    lengths = np.clip(rng.lognormal(np.log(100), 1.0, 4096).astype(int), 20, 2000)
    out = {}
    for batch in (1, 64):
        inputs = []
        for r in range(8):
            histories = [
                [str(i) for i in rng.integers(0, items, lengths[(r * batch + b) % len(lengths)])]
                for b in range(batch)
            ]
            encoded = encoder.encode([{"country": "a"}] * batch, histories)
            inputs.append({k: torch.from_numpy(v) for k, v in encoded.items()})
        with torch.no_grad():
            for x in inputs:  # warm-up: TorchScript profiles its first calls
                tower(x)
            start = time.perf_counter()
            for _ in range(rounds):
                for x in inputs:
                    tower(x)
        per_call_ms = (time.perf_counter() - start) / (rounds * len(inputs)) * 1e3
        out[f"batch_{batch}_ms_per_user"] = round(per_call_ms / batch, 4)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--items", type=int, default=3700)
    p.add_argument("--rounds", type=int, default=20, help="passes over 8 batches per size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as the service runs (TORCH_THREADS=1)
    report: dict[str, Any] = {
        "benchmark": "tower_encode",
        "items": args.items,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2, AVX512, ...
        "towers": {},
    }
    for name, (config, length) in TOWERS.items():
        report["towers"][name] = measure(config, length, args.items, args.rounds, args.seed)
        print(f"{name}: {report['towers'][name]}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

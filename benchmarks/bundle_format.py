"""Bundle format 2: how to ship the towers, measured in one process, in one run.

    nice -n 10 .venv/bin/python benchmarks/bundle_format.py \
        --json benchmarks/results/bundle_format.json

Candidates, for the field user tower (default, L100), the sequential user tower (d64, L200)
and the item tower (prior folded in, as the trainer exports them):
- `torchscript`: format 1's `torch.jit.script` + save / load (deprecated in torch 2.13): the
  baseline;
- `export`: `torch.export` `ExportedProgram`, `torch.export.save` / `load`, `.module()`;
- `aoti`: AOTInductor packages (`aoti_compile_and_package` / `aoti_load_package`): compiling
  needs a C++ compiler, loading runs the compiled library;
- `safetensors`: the weights alone, rebuilt by the package's own tower code and scripted at
  load (`models.tower_format`: what format 2 ships and the service runs);
- `safetensors-eager`: the same weights and rebuild, run eager (the fallback of a torch
  without TorchScript);
- `eager`: the towers in memory, never written (the floor of the rebuilt ones).

Encode: milliseconds per call at batch 1 and batch 64, the median of `--calls` calls per
candidate, interleaved (each round times every candidate once, in a shuffled order), one
math thread. Load: seconds to read both towers of a bundle back, randomly initialised towers
over `--load-items` items (median of 3). Parity: max abs difference from eager. JSON on
stdout (and `--json FILE`), progress on stderr. Towers are untrained: the cost does not depend
on the weights.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models import bundle as b
from models import tower_format as tf
from models.feature_spec import fit_feature
from models.features import FeatureEncoder
from models.serving_towers import PriorItemTower
from models.tower_config import TowerConfig
from models.towers import PriorUserTower, TwoTower

TOWERS = {  # name -> (architecture, history length)
    "field": (TowerConfig(), 100),
    "sequence": (TowerConfig(user_tower="sequence", field_dim=64, dropout=0.2), 200),
}
CANDIDATES = ("torchscript", "export", "aoti", "safetensors", "safetensors-eager", "eager")
INVERSE_NORM = 0.9
Towers = tuple[nn.Module, nn.Module]


def encoders(length: int, n_items: int) -> tuple[FeatureEncoder, FeatureEncoder]:
    catalogue = {str(i): i for i in range(n_items)}
    user = [
        fit_feature("country", "categorical", ["a", "b", "c", "d"]),
        fit_feature("age", "numeric", [18.0, 30.0, 45.0, 70.0]),
    ]
    item = [
        fit_feature("category", "categorical", [f"c{i}" for i in range(20)]),
        fit_feature("tags", "multi_hot", [f"t{i}|t{i + 1}" for i in range(50)]),
        fit_feature("price", "numeric", [1.0, 5.0, 20.0, 100.0]),
    ]
    return FeatureEncoder(user, length, catalogue), FeatureEncoder(item)


def serving(config: TowerConfig, length: int, n_items: int) -> tuple[Towers, dict[str, Any]]:
    """Eager serving towers (popularity prior folded in) and the manifest fields of them."""
    user_enc, item_enc = encoders(length, n_items)
    model = TwoTower(user_enc, item_enc, n_items, config).eval()
    columns = torch.rand(n_items + 1, 2)
    towers = (
        PriorUserTower(model.user_tower).eval(),
        PriorItemTower(model.item_tower, columns, INVERSE_NORM).eval(),
    )
    record = tf.towers_record(config, n_items, user_prior=True, inverse_norm=INVERSE_NORM)
    manifest = {"format_version": 2, "tower_format": "safetensors", "towers": record}
    return towers, manifest | {"encoders": (user_enc, item_enc)}


def inputs(
    length: int, n_items: int, batch: int, seed: int
) -> tuple[dict[str, Tensor], tuple[Tensor, dict[str, Tensor]]]:
    rng = np.random.default_rng(seed)
    user_enc, item_enc = encoders(length, n_items)
    lengths = np.clip(rng.lognormal(np.log(100), 1.0, batch).astype(int), 20, 2000)
    histories = [[str(i) for i in rng.integers(0, n_items, n)] for n in lengths]
    users = user_enc.encode([{"country": "b", "age": 33.0}] * batch, histories)
    items = item_enc.encode([{"category": "c3", "tags": "t1|t7", "price": 9.0}] * batch)
    rows = torch.from_numpy(rng.integers(-1, n_items, batch))
    return {k: torch.from_numpy(v) for k, v in users.items()}, (
        rows,
        {k: torch.from_numpy(v) for k, v in items.items()},
    )


def save(
    candidate: str, towers: Towers, examples: tuple[Any, Any], meta: dict[str, Any], out: Path
) -> None:
    """Write `towers` to `out` as `candidate` ships them."""
    out.mkdir(parents=True)
    user, item = towers
    if candidate == "torchscript":  # format 1's user_tower.pt, and the item tower alike
        torch.jit.save(torch.jit.script(user), str(out / "user.pt"))
        torch.jit.save(torch.jit.script(item), str(out / "item.pt"))
    elif candidate.startswith("safetensors"):  # format 2, as the exporter writes it
        meta["encoders"][0].save(out / b.FEATURE_SPEC)
        meta["encoders"][1].save(out / b.ITEM_FEATURE_SPEC)
        tf.save_towers(out, tf.Towers(user, item))
    elif candidate in ("export", "aoti"):
        programs = exported_programs(towers, examples)
        for name, program in zip(("user", "item"), programs, strict=True):
            if candidate == "export":
                torch.export.save(program, out / f"{name}.pt2")
            else:
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(out / f"{name}.pt2")
                )


def exported_programs(towers: Towers, examples: tuple[Any, Any]) -> list[Any]:
    """Both towers through `torch.export`, the batch dimension dynamic."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    user_in, (rows, item_in) = examples
    user_shapes = ({k: {0: batch} for k in user_in},)
    item_shapes = ({0: batch}, {k: {0: batch} for k in item_in})
    return [
        torch.export.export(towers[0], (user_in,), dynamic_shapes=user_shapes),
        torch.export.export(towers[1], (rows, item_in), dynamic_shapes=item_shapes),
    ]


def load(candidate: str, meta: dict[str, Any], out: Path, eager: Towers) -> Towers:
    """Read back what `save` wrote, as a service would."""
    if candidate == "eager":
        return eager
    if candidate == "torchscript":
        return torch.jit.load(str(out / "user.pt")), torch.jit.load(str(out / "item.pt"))
    if candidate.startswith("safetensors"):
        manifest = {k: v for k, v in meta.items() if k != "encoders"}
        loaded = tf.load_towers(out, manifest, script=candidate == "safetensors")
        assert loaded.item is not None
        return loaded.user, loaded.item
    if candidate == "export":
        user, item = (torch.export.load(out / f"{n}.pt2").module() for n in ("user", "item"))
        return user, item
    user, item = (
        torch._inductor.aoti_load_package(str(out / f"{n}.pt2")) for n in ("user", "item")
    )
    return user, item


def timed(fn: Callable[..., Any], *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


@torch.inference_mode()
def encode_costs(
    loaded: dict[str, Towers], eager: Towers, length: int, n_items: int, calls: int, seed: int
) -> dict[str, Any]:
    """Per candidate and batch size: median ms per call of each tower, and the parity."""
    out: dict[str, Any] = {c: {} for c in loaded}
    order = list(loaded)
    shuffle = random.Random(seed)
    for batch in (1, 64):
        examples = [inputs(length, n_items, batch, seed + i) for i in range(8)]
        times: dict[tuple[str, str], list[float]] = {
            (c, t): [] for c in loaded for t in ("user", "item")
        }
        for round_ in range(calls + 10):  # the first 10 are warm-up (profiling executors)
            shuffle.shuffle(order)
            user_in, (rows, feats) = examples[round_ % len(examples)]
            for c in order:
                user, item = loaded[c]
                t_user, t_item = timed(user, user_in), timed(item, rows, feats)
                if round_ >= 10:
                    times[c, "user"].append(t_user)
                    times[c, "item"].append(t_item)
        user_in, (rows, feats) = examples[0]
        for c in loaded:
            user, item = loaded[c]
            diff = max(
                float((user(user_in) - eager[0](user_in)).abs().max()),
                float((item(rows, feats) - eager[1](rows, feats)).abs().max()),
            )
            out[c][f"batch_{batch}"] = {
                f"{t}_ms": round(statistics.median(times[c, t]) * 1e3, 4) for t in ("user", "item")
            } | {"parity_max_abs_diff": diff}
    return out


def measure_encode(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    config, length = TOWERS[name]
    eager, meta = serving(config, length, args.items)
    examples = inputs(length, args.items, 4, args.seed)
    loaded: dict[str, Towers] = {}
    compile_s: dict[str, float] = {}
    failed: dict[str, Any] = {}
    for c in args.candidates:
        out = work / f"{name}-{c}"
        try:
            compile_s[c] = round(timed(save, c, eager, examples, meta, out), 2)
            loaded[c] = load(c, meta, out, eager)
        except Exception as exc:  # a candidate that cannot ship this tower is a finding
            failed[c] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(f"{name}: {c} {failed.get(c) or f'written in {compile_s[c]} s'}", file=sys.stderr)
    costs = encode_costs(loaded, eager, length, args.items, args.calls, args.seed)
    for c in costs:
        costs[c]["export_s"] = compile_s[c]
    return costs | failed


def measure_load(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Seconds to load both field towers over `--load-items` items, median of 3, and the
    bytes on disk."""
    config, length = TOWERS["field"]
    eager, meta = serving(config, length, args.load_items)
    examples = inputs(length, args.load_items, 4, args.seed)
    out: dict[str, Any] = {}
    for c in args.candidates:
        path = work / f"load-{c}"
        try:
            save(c, eager, examples, meta, path)
            seconds = [timed(load, c, meta, path, eager) for _ in range(3)]
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            out[c] = {
                "load_s": round(statistics.median(seconds), 3),
                "megabytes": round(size / 2**20, 1),
            }
        except Exception as exc:  # as in measure_encode: a finding, not the end of the report
            out[c] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(f"load {c}: {out[c]}", file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--items", type=int, default=3700, help="catalogue of the encode timings")
    p.add_argument("--load-items", type=int, default=1_000_000)
    p.add_argument("--calls", type=int, default=300, help="timed calls per candidate, tower, batch")
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--towers", default=",".join(TOWERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.candidates = args.candidates.split(",")
    torch.set_num_threads(1)  # as the service runs (TORCH_THREADS=1)
    torch.manual_seed(args.seed)
    report: dict[str, Any] = {
        "benchmark": "bundle_format",
        "torch": torch.__version__,
        "items": args.items,
        "load_items": args.load_items,
        "calls": args.calls,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report["encode"] = {
            name: measure_encode(name, args, work) for name in args.towers.split(",")
        }
        report["load"] = measure_load(args, work) if args.load_items else {}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

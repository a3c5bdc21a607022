"""Bundles for the benchmarks and the fault suite: trained by the real trainer on the synthetic
source, cached by recipe.

A bundle is built with `python -m models train --split none` into a temporary directory and
renamed into `<cache>/<recipe key>/` only once complete, so an interrupted build is never
mistaken for a cached one. The key names every parameter, so a changed recipe trains anew.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RECIPE_FILE = "recipe.json"
TRAIN_LOG = "train.log"


def _or_default(value: int | None) -> str:
    return "d" if value is None else str(value)  # a cache key's "the trainer's default"


@dataclass(frozen=True)
class Recipe:
    """Everything a benchmark bundle is a function of.

    Attributes:
        items: catalogue size.
        users: synthetic users (all of them are published to Redis and queried).
        seed: synthetic data and training seed.
        per_user: the synthetic source's mean interactions per user (None: its default, 45,
            so histories of 30-60 items); set it to fill a longer tower's history.
        epochs, batch_size, field_dim, hidden, out_dim, history_length, popularity_prior:
            trainer options; None leaves the trainer's default, which for field_dim and
            history_length depends on the user tower (its preset: 64 and 200 for the
            sequential tower, 32 and 100 for the field tower).
    """

    items: int
    users: int
    seed: int = 0
    per_user: int | None = None
    epochs: int = 1
    batch_size: int = 2048
    field_dim: int | None = None
    hidden: str = "256"
    out_dim: int = 64
    history_length: int | None = None
    popularity_prior: float | None = None  # None: the trainer's default
    # More trainer options, as on its command line (e.g. "--user-tower sequence
    # --negatives mixed"): the key names them by a digest.
    train_args: str = ""

    @property
    def source(self) -> str:
        per_user = "" if self.per_user is None else f",per_user={self.per_user}"
        return f"synthetic:seed={self.seed},users={self.users},items={self.items}{per_user}"

    @property
    def key(self) -> str:
        return (
            f"synthetic-s{self.seed}-u{self.users}-i{self.items}"
            + ("" if self.per_user is None else f"-n{self.per_user}")
            + f"-e{self.epochs}-b{self.batch_size}"
            f"-f{_or_default(self.field_dim)}-h{self.hidden.replace(',', 'x')}-o{self.out_dim}"
            f"-l{_or_default(self.history_length)}"
            + ("" if self.popularity_prior is None else f"-p{self.popularity_prior:g}")
            + (
                f"-a{hashlib.sha256(self.train_args.encode()).hexdigest()[:8]}"
                if self.train_args
                else ""
            )
        )

    def train_command(self, out: Path) -> list[str]:
        given = {
            "--field-dim": self.field_dim,
            "--history-length": self.history_length,
            "--popularity-prior": self.popularity_prior,
        }
        options: list[str] = []
        for name, value in given.items():
            if value is not None:  # else the trainer's default
                options += [name, str(value)]
        return [
            sys.executable,
            "-m",
            "models",
            "train",
            "--data",
            self.source,
            "--split",
            "none",
            "--out",
            str(out),
            "--seed",
            str(self.seed),
            "--epochs",
            str(self.epochs),
            "--validation-fraction",
            "0",
            "--batch-size",
            str(self.batch_size),
            "--hidden",
            self.hidden,
            "--out-dim",
            str(self.out_dim),
            *options,
            *shlex.split(self.train_args),
        ]


@dataclass(frozen=True)
class BuiltBundle:
    """A MODEL_DIR (LATEST + one version) holding the recipe's bundle."""

    recipe: Recipe
    model_dir: Path
    version: str
    train_s: float
    cached: bool

    def describe(self) -> dict[str, Any]:
        manifest = json.loads((self.model_dir / self.version / "manifest.json").read_text())
        model, training = manifest.get("model", {}), manifest.get("training", {})
        return {
            "recipe": asdict(self.recipe),
            "source": self.recipe.source,
            "model_dir": str(self.model_dir),
            "version": self.version,
            "embedding_dim": manifest.get("embedding_dim"),
            "n_items": manifest.get("n_items"),
            # What the trainer's defaults made of the recipe (they change as models/ evolves).
            "trainer": {
                "dropout": model.get("dropout"),
                "history_length": training.get("history_length"),
                "popularity_prior": training.get(
                    "popularity_prior_chosen", training.get("popularity_prior")
                ),
                "epochs_run": len(training.get("history", [])),
            },
            "train_s": round(self.train_s, 1),
            "cached": self.cached,
        }


def _cached(model_dir: Path, recipe: Recipe) -> BuiltBundle | None:
    try:
        meta = json.loads((model_dir / RECIPE_FILE).read_text())
        version = (model_dir / "LATEST").read_text().strip()
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if (
        meta.get("recipe") != asdict(recipe)
        or not (model_dir / version / "manifest.json").is_file()
    ):
        return None
    return BuiltBundle(recipe, model_dir, version, float(meta.get("train_s", 0.0)), cached=True)


def ensure_bundle(recipe: Recipe, cache_dir: Path, log: Any = sys.stderr) -> BuiltBundle:
    """The cached bundle of `recipe`, training it first when absent.

    Training uses every core (the service and load runs have not started yet) and writes the
    trainer's output to `<bundle>/train.log`.

    Raises:
        RuntimeError: the trainer failed (its log tail is in the message).
    """
    model_dir = cache_dir / recipe.key
    found = _cached(model_dir, recipe)
    if found is not None:
        return found
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{recipe.key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # the trainer may use every core
    print(f"training bundle {recipe.key} (cached afterwards) ...", file=log, flush=True)
    start = time.perf_counter()
    with (tmp / TRAIN_LOG).open("w") as out:
        proc = subprocess.run(
            recipe.train_command(tmp),
            stdout=subprocess.PIPE,
            stderr=out,
            text=True,
            env=env,
            check=False,
        )
    train_s = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (tmp / TRAIN_LOG).read_text()[-2000:]
        raise RuntimeError(f"training {recipe.key} failed ({proc.returncode}):\n{tail}")
    version = Path(proc.stdout.strip().splitlines()[-1]).name
    meta = {"recipe": asdict(recipe), "train_s": train_s, "version": version}
    (tmp / RECIPE_FILE).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)
    print(f"trained {recipe.key} in {train_s:.0f} s", file=log, flush=True)
    return BuiltBundle(recipe, model_dir, version, train_s, cached=False)

"""Bad bundles, each a copy of a good one damaged one way, under a version name of its own.

Unless the damage is to the checksums themselves, the manifest is re-hashed afterwards, so
the loader must catch the damage by itself (shapes, TorchScript, warm-up), not only by sha256.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models import bundle as b


def _truncate_embeddings(path: Path) -> None:
    data = (path / b.ITEM_EMBEDDINGS).read_bytes()
    (path / b.ITEM_EMBEDDINGS).write_bytes(data[: len(data) // 2])


def _drop_manifest(path: Path) -> None:
    (path / b.MANIFEST).unlink()


def _flip_a_byte(path: Path) -> None:
    data = bytearray((path / b.ITEM_EMBEDDINGS).read_bytes())
    data[-1] ^= 0xFF
    (path / b.ITEM_EMBEDDINGS).write_bytes(bytes(data))


def _widen_embeddings(path: Path) -> None:
    """Files and manifest agree, but items have one dimension more than the tower outputs."""
    emb = np.load(path / b.ITEM_EMBEDDINGS)
    wide = np.hstack([emb, np.zeros((emb.shape[0], 1), dtype=np.float32)])
    np.save(path / b.ITEM_EMBEDDINGS, wide)
    manifest = json.loads((path / b.MANIFEST).read_text())
    manifest["embedding_dim"] = int(wide.shape[1])
    (path / b.MANIFEST).write_text(json.dumps(manifest))


def _garble_tower(path: Path) -> None:
    (path / b.TOWERS_WEIGHTS).write_bytes(b"not a safetensors file")


@dataclass(frozen=True)
class Corruption:
    name: str
    damage: Callable[[Path], None]
    rehash: bool
    reason: str  # what the refusal must say


CORRUPTIONS = (
    Corruption("truncated embeddings", _truncate_embeddings, True, "item_embeddings.npy"),
    Corruption("missing manifest", _drop_manifest, False, "missing manifest.json"),
    Corruption("wrong checksum", _flip_a_byte, False, "checksum mismatch for item_embeddings.npy"),
    Corruption("mismatched dimension", _widen_embeddings, True, "item embeddings have dim"),
    Corruption("tower fails to load", _garble_tower, True, "towers.safetensors cannot be loaded"),
)


def make_bad_version(model_dir: Path, good: Path, n: int, corruption: Corruption) -> str:
    """Copy `good` into `model_dir` as a new version, damaged by `corruption`; its name."""
    name = f"20991231T2359{n:02d}Z-bad{n:03d}"
    target = model_dir / name
    shutil.copytree(good, target)
    manifest = json.loads((target / b.MANIFEST).read_text())
    manifest["version"] = name
    (target / b.MANIFEST).write_text(json.dumps(manifest))
    corruption.damage(target)
    if corruption.rehash:
        manifest = json.loads((target / b.MANIFEST).read_text())
        for file in manifest["sha256"]:  # the files this bundle's format lists
            manifest["sha256"][file] = b.sha256_file(target / file)
        (target / b.MANIFEST).write_text(json.dumps(manifest))
    return name

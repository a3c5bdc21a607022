"""Export a trained model as a versioned bundle (layout and verification: `models.bundle`)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models import bundle as b
from models.popularity_prior import serving_user_tower
from models.trained import TrainedModel

# TorchScript must reproduce the eager tower; float32 reassociation stays far below this.
PARITY_TOLERANCE = 1e-4


def script_user_tower(trained: TrainedModel) -> torch.jit.ScriptModule:
    tower = copy.deepcopy(serving_user_tower(trained)).cpu().eval()
    return torch.jit.script(tower)


@torch.no_grad()
def parity(
    trained: TrainedModel, scripted: torch.jit.ScriptModule, inputs: dict[str, Tensor]
) -> float:
    """Max abs difference between the eager and the scripted tower on the same inputs."""
    eager = copy.deepcopy(serving_user_tower(trained)).cpu().eval()
    return float((eager(inputs) - scripted(inputs)).abs().max())


def export_bundle(
    trained: TrainedModel,
    root: Path,
    item_matrix: np.ndarray,
    parity_inputs: dict[str, Tensor],
    metadata: dict[str, Any],
) -> Path:
    """Write a new version under `root`, verify it, and point `LATEST` at it.

    The bundle is assembled in a hidden staging directory and renamed into place, so a reader
    never sees a half-written version and an existing version is never overwritten.

    Args:
        trained: the model to export.
        root: the artifacts directory.
        item_matrix: `(n_items, dim)` vectors to index, matching the exported user tower's
            output (`models.popularity_prior.serving_item_matrix`).
        parity_inputs: encoded user inputs for the TorchScript parity check.
        metadata: extra manifest fields (training config, data summary, metrics...).

    Returns:
        The new version directory.
    """
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        scripted = script_user_tower(trained)
        torch.jit.save(scripted, str(staging / b.USER_TOWER))
        reloaded = torch.jit.load(str(staging / b.USER_TOWER))
        max_diff = parity(trained, reloaded, parity_inputs)
        if not max_diff <= PARITY_TOLERANCE:
            raise b.BundleError(f"TorchScript parity check failed: max abs diff {max_diff}")
        embeddings = np.ascontiguousarray(item_matrix, dtype=np.float32)
        np.save(staging / b.ITEM_EMBEDDINGS, embeddings, allow_pickle=False)
        (staging / b.ITEM_IDS).write_text(json.dumps(trained.item_ids))
        trained.user_encoder.save(staging / b.FEATURE_SPEC)
        manifest = _manifest(trained, staging, embeddings, max_diff, metadata)
        version = manifest["version"]
        (staging / b.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        target = b.version_dir(root, version)
        if target.exists():
            raise b.BundleError(f"version {version} already exists; refusing to overwrite it")
        staging.chmod(0o755)  # mkdtemp's 0700 would hide it from a service run as another user
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    b.verify_bundle(target)
    b.write_latest(root, version)
    return target


def _manifest(
    trained: TrainedModel,
    staging: Path,
    embeddings: np.ndarray,
    max_diff: float,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of the files written in `staging`, its version named after its time of
    creation and a digest of its content."""
    created = datetime.now(UTC)
    manifest: dict[str, Any] = {
        "format_version": b.FORMAT_VERSION,
        "created_at": created.isoformat(),
        "embedding_dim": int(embeddings.shape[1]),
        "n_items": int(embeddings.shape[0]),
        "metric": "inner_product",
        # Unit vectors on both sides, a popularity prior folded in or not (PriorUserTower).
        "normalized": True,
        "popularity_prior": trained.prior_weight,
        "popularity_prior_half_life_days": trained.prior_half_life_days,
        "parity_max_abs_diff": max_diff,
        **metadata,
        "sha256": {name: b.sha256_file(staging / name) for name in b.BUNDLE_FILES},
    }
    content = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return {"version": f"{created:%Y%m%dT%H%M%SZ}-{content[:6]}", **manifest}

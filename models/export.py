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
from torch import Tensor, nn

from models import bundle as b
from models import tower_format
from models.item_attributes import ItemAttributes
from models.popularity_prior import serving_user_tower
from models.serving_towers import prior_layout, serving_towers
from models.trained import TrainedModel

# The exported towers must reproduce the eager ones (and the item tower the indexed rows);
# float32 reassociation stays far below this.
PARITY_TOLERANCE = 1e-4
# Catalogue rows the item tower's parity check embeds (evenly spaced over the catalogue).
ITEM_PARITY_ROWS = 512


@torch.no_grad()
def parity(eager: nn.Module, exported: nn.Module, inputs: dict[str, Tensor]) -> float:
    """Max abs difference between the eager and the exported user tower on the same inputs."""
    return float((eager(inputs) - exported(inputs)).abs().max())


@torch.no_grad()
def item_parity(
    trained: TrainedModel, eager: nn.Module, exported: nn.Module, item_matrix: np.ndarray
) -> float:
    """Max abs difference of the exported item tower, on sampled catalogue rows with their
    attributes, from their rows of `item_matrix` (what the index holds), and, on the same
    attributes under an id outside the catalogue, from the eager serving item tower."""
    n_items = len(item_matrix)
    rows = torch.from_numpy(np.unique(np.linspace(0, n_items - 1, ITEM_PARITY_ROWS).astype(int)))
    features = {name: values[rows] for name, values in trained.item_features.items()}
    known = exported(rows, features).numpy()
    diff = float(np.abs(known - item_matrix[rows.numpy()]).max())
    unknown = torch.full_like(rows, -1)
    new = (eager(unknown, features) - exported(unknown, features)).abs().max()
    return max(diff, float(new))


def export_bundle(
    trained: TrainedModel,
    root: Path,
    item_matrix: np.ndarray,
    parity_inputs: dict[str, Tensor],
    metadata: dict[str, Any],
    *,
    format_version: int = b.FORMAT_VERSION,
    item_attributes: ItemAttributes | None = None,
) -> Path:
    """Write a new version under `root`, verify it, and point `LATEST` at it.

    The bundle is assembled in a hidden staging directory and renamed into place, so a reader
    never sees a half-written version and an existing version is never overwritten.

    Args:
        trained: the model to export.
        root: the artifacts directory.
        item_matrix: `(n_items, dim)` vectors to index, matching the exported user tower's
            output (`models.popularity_prior.serving_item_matrix`).
        parity_inputs: encoded user inputs for the user tower's parity check.
        metadata: extra manifest fields (training config, data summary, metrics...).
        format_version: 2 (towers in `bundle.TOWER_FORMAT`, item tower included), or 1:
            the earlier layout (TorchScript user tower only), kept to test that it still loads.
        item_attributes: the catalogue's raw attributes in `trained.item_ids` order, written
            as `item_attributes.npz` (any format) for the service's recall filters.

    Returns:
        The new version directory.
    """
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        embeddings = np.ascontiguousarray(item_matrix, dtype=np.float32)
        fields = _write_towers(trained, staging, embeddings, parity_inputs, format_version)
        np.save(staging / b.ITEM_EMBEDDINGS, embeddings, allow_pickle=False)
        (staging / b.ITEM_IDS).write_text(json.dumps(trained.item_ids))
        trained.user_encoder.save(staging / b.FEATURE_SPEC)
        if item_attributes is not None:
            item_attributes.save(staging / b.ITEM_ATTRIBUTES)
        manifest = _manifest(trained, staging, embeddings, fields | metadata)
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


def _write_towers(
    trained: TrainedModel,
    staging: Path,
    item_matrix: np.ndarray,
    parity_inputs: dict[str, Tensor],
    format_version: int,
) -> dict[str, Any]:
    """Write the towers, read them back and check them against eager; the manifest's fields
    that describe them.

    The eager towers compared with are fresh copies of the trained ones, not the modules
    handed to `save_towers`.

    Raises:
        BundleError: an exported tower disagrees with the eager one beyond PARITY_TOLERANCE.
    """
    if format_version == 1:
        scripted = copy.deepcopy(serving_user_tower(trained)).cpu().eval()
        tower_format.save_towers(staging, tower_format.Towers(scripted, None))
        loaded = tower_format.load_towers(staging, {"format_version": 1})
        user = copy.deepcopy(serving_user_tower(trained)).cpu().eval()
        max_diff = _checked("user", parity(user, loaded.user, parity_inputs))
        return {"format_version": 1, "parity_max_abs_diff": max_diff}
    tower_format.save_towers(staging, tower_format.Towers(*serving_towers(trained, item_matrix)))
    user, item = serving_towers(trained, item_matrix)
    fmt = b.TOWER_FORMAT
    layout = prior_layout(item_matrix, trained.config.tower.out_dim)
    record = tower_format.towers_record(
        trained.config.tower,
        len(item_matrix),
        user_prior=bool(trained.prior_weight),
        inverse_norm=None if layout is None else layout[1],
    )
    header = {"format_version": format_version, "tower_format": fmt, "towers": record}
    trained.user_encoder.save(staging / b.FEATURE_SPEC)  # the weights' loader reads the specs
    trained.item_encoder.save(staging / b.ITEM_FEATURE_SPEC)
    loaded = tower_format.load_towers(staging, header)
    assert loaded.item is not None
    return header | {
        "parity_max_abs_diff": _checked("user", parity(user, loaded.user, parity_inputs)),
        "item_tower": {
            "inputs": ["item_row", *trained.item_encoder.names],
            "prior_folded": layout is not None,
            "parity_max_abs_diff": _checked(
                "item", item_parity(trained, item, loaded.item, item_matrix)
            ),
        },
    }


def _checked(tower: str, max_diff: float) -> float:
    if not max_diff <= PARITY_TOLERANCE:
        raise b.BundleError(f"{tower} tower parity check failed: max abs diff {max_diff}")
    return max_diff


def _manifest(
    trained: TrainedModel,
    staging: Path,
    embeddings: np.ndarray,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of the files written in `staging`, its version named after its time of
    creation and a digest of its content."""
    created = datetime.now(UTC)
    manifest: dict[str, Any] = {
        "created_at": created.isoformat(),
        "embedding_dim": int(embeddings.shape[1]),
        "n_items": int(embeddings.shape[0]),
        "metric": "inner_product",
        # Unit vectors on both sides, a popularity prior folded in or not (PriorUserTower).
        "normalized": True,
        "popularity_prior": trained.prior_weight,
        "popularity_prior_half_life_days": trained.prior_half_life_days,
        **metadata,
        "sha256": {
            name: b.sha256_file(staging / name)
            for name in (*b.bundle_files(metadata), *b.OPTIONAL_FILES)
            if (staging / name).is_file() or name not in b.OPTIONAL_FILES
        },
    }
    content = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return {"version": f"{created:%Y%m%dT%H%M%SZ}-{content[:6]}", **manifest}

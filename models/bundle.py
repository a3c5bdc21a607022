"""The bundle on disk: layout, version names, `LATEST`, and verification.

Dependency-light (numpy + standard library) so the online service verifies bundles with the
same code the exporter wrote them with. Layout (docs/design.md):

    <root>/LATEST                 the current version name, replaced atomically
    <root>/<version>/manifest.json, user_tower.pt, item_embeddings.npy, item_ids.json,
                     feature_spec.json
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
USER_TOWER = "user_tower.pt"
ITEM_EMBEDDINGS = "item_embeddings.npy"
ITEM_IDS = "item_ids.json"
FEATURE_SPEC = "feature_spec.json"
BUNDLE_FILES = (USER_TOWER, ITEM_EMBEDDINGS, ITEM_IDS, FEATURE_SPEC)
LATEST = "LATEST"
# |squared norm - 1| allowed of a unit vector stored in float32 (rounding leaves ~1e-7).
UNIT_TOLERANCE = 1e-3
# 20261122T113000Z-3f9a1c: UTC time + short content hash; nothing else is a version.
VERSION_PATTERN = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6,64}$")


class BundleError(ValueError):
    """A bundle is missing, incomplete, tampered with or inconsistent."""


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose checksums and shapes have been checked; arrays are loaded.

    Attributes:
        path: the version directory.
        manifest: the parsed manifest.
        item_embeddings: float32 `(n_items, dim)`, read-only.
        item_ids: external item ids, row order.
        feature_spec: the parsed `feature_spec.json`.
    """

    path: Path
    manifest: dict[str, Any]
    item_embeddings: np.ndarray
    item_ids: list[str]
    feature_spec: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def user_tower_path(self) -> Path:
        return self.path / USER_TOWER


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_version_name(name: str) -> bool:
    return bool(VERSION_PATTERN.fullmatch(name))


def version_dir(root: Path, version: str) -> Path:
    """The directory of `version` under `root`; refuses anything that is not a version name,
    so a caller-supplied name can never reach outside `root`."""
    if not is_version_name(version):
        raise BundleError(f"invalid version name {version!r}")
    return root / version


def read_latest(root: Path) -> str:
    try:
        version = (root / LATEST).read_text().strip()
    except FileNotFoundError as exc:
        raise BundleError(f"no {LATEST} file in {root}") from exc
    if not is_version_name(version):
        raise BundleError(f"{root / LATEST} names an invalid version {version!r}")
    return version


def write_latest(root: Path, version: str) -> None:
    """Point `LATEST` at `version` atomically (temp file in the same directory + os.replace)."""
    version_dir(root, version)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".LATEST.")
    with os.fdopen(fd, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a service run as another user
    os.replace(tmp, root / LATEST)


def list_versions(root: Path) -> list[str]:
    """Version directories under `root` (complete or not), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and is_version_name(p.name))


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BundleError(f"missing {path.name}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path.name} is not valid JSON: {exc}") from exc


def _check_vectors(embeddings: np.ndarray, *, unit: bool, chunk: int = 65536) -> None:
    """Every item vector finite, and of length 1 where the manifest says so: one NaN or huge
    row would top every user's list. In chunks, so a memory-mapped matrix is read once
    without a copy of it."""
    for start in range(0, len(embeddings), chunk):
        rows = np.asarray(embeddings[start : start + chunk], dtype=np.float64)
        squared = np.einsum("ij,ij->i", rows, rows)
        bad = ~np.isfinite(squared)
        if unit:
            bad |= np.abs(squared - 1.0) > UNIT_TOLERANCE
        if bad.any():
            row = start + int(np.argmax(bad))
            what = "unit-length" if unit else "finite"
            raise BundleError(
                f"{ITEM_EMBEDDINGS}: row {row} is not {what} (squared norm {squared[row - start]})"
            )


def verify_bundle(path: Path) -> VerifiedBundle:
    """Check every file's sha256 against the manifest, then shapes and dtypes.

    Raises:
        BundleError: with the reason, for anything that must not be served.
    """
    if not path.is_dir():
        raise BundleError(f"bundle {path.name!r} does not exist")
    manifest = _load_json(path / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError("manifest.json: missing or unsupported format_version")
    if manifest.get("version") != path.name:
        raise BundleError(f"manifest names version {manifest.get('version')!r}, not {path.name!r}")
    checksums = manifest.get("sha256")
    if not isinstance(checksums, dict) or set(checksums) != set(BUNDLE_FILES):
        raise BundleError(f"manifest.json: sha256 must list exactly {sorted(BUNDLE_FILES)}")
    for name in BUNDLE_FILES:
        file = path / name
        if not file.is_file():
            raise BundleError(f"missing {name}")
        if sha256_file(file) != checksums[name]:
            raise BundleError(f"checksum mismatch for {name}")
    try:
        embeddings = np.load(path / ITEM_EMBEDDINGS, allow_pickle=False, mmap_mode="r")
    except ValueError as exc:
        raise BundleError(f"{ITEM_EMBEDDINGS} is not a plain .npy array: {exc}") from exc
    item_ids = _load_json(path / ITEM_IDS)
    dim, n_items = manifest.get("embedding_dim"), manifest.get("n_items")
    if embeddings.dtype != np.float32 or embeddings.shape != (n_items, dim):
        raise BundleError(
            f"{ITEM_EMBEDDINGS} is {embeddings.dtype} {embeddings.shape}, "
            f"manifest says float32 ({n_items}, {dim})"
        )
    _check_vectors(embeddings, unit=manifest.get("normalized") is True)
    if (
        not isinstance(item_ids, list)
        or len(item_ids) != n_items
        or not all(isinstance(i, str) for i in item_ids)
    ):
        raise BundleError(f"{ITEM_IDS} must be a list of {n_items} string ids")
    if len(set(item_ids)) != len(item_ids):
        raise BundleError(f"{ITEM_IDS} holds duplicate ids")
    return VerifiedBundle(
        path=path,
        manifest=manifest,
        item_embeddings=np.asarray(embeddings),
        item_ids=[str(i) for i in item_ids],
        feature_spec=_load_json(path / FEATURE_SPEC),
    )

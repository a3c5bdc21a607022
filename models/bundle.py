"""The bundle on disk: layout, version names, `LATEST`, and verification.

Dependency-light (numpy, safetensors and the standard library) so the online service verifies
bundles with the same code the exporter wrote them with. Layout (docs/design.md):

    <root>/LATEST                 the current version name, replaced atomically
    <root>/<version>/manifest.json, item_embeddings.npy, item_ids.json, feature_spec.json,
                     the towers' files (`TOWER_FILES` of the manifest's `tower_format`), and
                     from format 2 on item_feature_spec.json (`FORMAT_2_FILES`)

Format 1 bundles (a TorchScript user tower only, no item tower) still verify and serve.
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
from safetensors import SafetensorError, safe_open

FORMAT_VERSION = 2
FORMAT_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
USER_TOWER = "user_tower.pt"
TOWERS_WEIGHTS = "towers.safetensors"
ITEM_EMBEDDINGS = "item_embeddings.npy"
ITEM_IDS = "item_ids.json"
FEATURE_SPEC = "feature_spec.json"
ITEM_FEATURE_SPEC = "item_feature_spec.json"
# Every format's files besides the towers'.
COMMON_FILES = (ITEM_EMBEDDINGS, ITEM_IDS, FEATURE_SPEC)
# Files a format 2 bundle has besides the common ones and the towers'.
FORMAT_2_FILES = (ITEM_FEATURE_SPEC,)
# Format 2's towers' files by the manifest's `tower_format` (docs/design.md, "Bundle format 2";
# format 1 has a TorchScript user tower alone, `USER_TOWER`).
TOWER_FORMAT = "safetensors"  # the one `tower_format` this version writes
TOWER_FILES: dict[str, tuple[str, ...]] = {TOWER_FORMAT: (TOWERS_WEIGHTS,)}
# Every file any format may hold (tools that rehash a bundle they edited read this).
BUNDLE_FILES = tuple(
    dict.fromkeys((USER_TOWER, *COMMON_FILES, *FORMAT_2_FILES, *sum(TOWER_FILES.values(), ())))
)
# The catalogue's raw item attributes (`models.item_attributes`), read by recall filters:
# optional in every format (older bundles lack it), covered by the manifest's sha256 when there.
ITEM_ATTRIBUTES = "item_attributes.npz"
OPTIONAL_FILES = (ITEM_ATTRIBUTES,)
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
        item_feature_spec: the parsed `item_feature_spec.json`; None in a format 1 bundle.
    """

    path: Path
    manifest: dict[str, Any]
    item_embeddings: np.ndarray
    item_ids: list[str]
    feature_spec: dict[str, Any]
    item_feature_spec: dict[str, Any] | None = None

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def format_version(self) -> int:
        return int(self.manifest["format_version"])

    @property
    def tower_format(self) -> str:
        """How the towers are stored (`TOWER_FILES`); format 1 is TorchScript."""
        return str(self.manifest.get("tower_format", "torchscript"))

    @property
    def has_item_tower(self) -> bool:
        return self.format_version >= 2


def bundle_files(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The files a bundle with this manifest must hold (and its `sha256` list)."""
    if manifest.get("format_version") == 1:
        return (USER_TOWER, *COMMON_FILES)
    tower_files = TOWER_FILES.get(str(manifest.get("tower_format")))
    if tower_files is None:
        raise BundleError(
            f"manifest.json: unknown tower_format {manifest.get('tower_format')!r}; "
            f"this version reads {sorted(TOWER_FILES)}"
        )
    return (*tower_files, *COMMON_FILES, *FORMAT_2_FILES)


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_version_name(name: str) -> bool:
    return bool(VERSION_PATTERN.fullmatch(name))


def version_dir(root: Path, version: str) -> Path:
    """The directory of `version` under `root`; refuses anything that is not a version name,
    so a caller-supplied name can never reach outside `root`."""
    if not is_version_name(version):
        raise BundleError(f"invalid version name {version!r}")
    return root / version


# More than a version name and its newline: not a LATEST this project wrote.
LATEST_MAX_BYTES = 256


def read_latest(root: Path) -> str:
    """The version `root/LATEST` names. Raises BundleError: no such file, or it does not hold
    a version name; its content is never quoted (the file may be any file, e.g. a link to
    the process's environment, and readiness shows the reason to any client)."""
    try:
        with (root / LATEST).open("rb") as f:
            raw = f.read(LATEST_MAX_BYTES + 1)
    except FileNotFoundError as exc:
        raise BundleError(f"no {LATEST} file in {root}") from exc
    version = raw.decode("utf-8", errors="replace").strip()
    if len(raw) > LATEST_MAX_BYTES or not is_version_name(version):
        raise BundleError(f"{root / LATEST} does not hold a version name")
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
    if not isinstance(manifest, dict) or manifest.get("format_version") not in FORMAT_VERSIONS:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        newer = isinstance(found, int) and found > max(FORMAT_VERSIONS)
        raise BundleError(
            f"manifest.json: format_version {found!r}; this version reads "
            f"{', '.join(map(str, FORMAT_VERSIONS))}"
            + (" (written by a newer trainer: serve it with a newer service)" if newer else "")
        )
    if manifest.get("version") != path.name:
        raise BundleError(f"manifest names version {manifest.get('version')!r}, not {path.name!r}")
    files = bundle_files(manifest)
    checksums = manifest.get("sha256")
    if not isinstance(checksums, dict) or not set(files) <= set(checksums) <= {
        *files,
        *OPTIONAL_FILES,
    }:
        raise BundleError(
            f"manifest.json: sha256 must list exactly {sorted(files)} "
            f"and any of {sorted(OPTIONAL_FILES)} present"
        )
    for name in checksums:
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
    _check_towers(path, manifest)
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
        item_feature_spec=_item_feature_spec(path, manifest),
    )


def _item_feature_spec(path: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The item encoder's spec of a format 2 bundle (None before), a JSON object with a
    feature list; the encoder checks the features themselves when it is built from it."""
    if manifest["format_version"] < 2:
        return None
    spec = _load_json(path / ITEM_FEATURE_SPEC)
    if not isinstance(spec, dict) or not isinstance(spec.get("features"), list):
        raise BundleError(f"{ITEM_FEATURE_SPEC} must be an object with a features list")
    return spec


def _check_towers(path: Path, manifest: dict[str, Any]) -> None:
    """`towers.safetensors`' header (read without torch or the weights): float32 tensors
    only, and the tables indexed by catalogue row as long as the catalogue + 1 (row 0: ids
    outside it), so a tower built for another catalogue is refused here, with the reason."""
    if manifest.get("tower_format") != TOWER_FORMAT:
        return
    n_items, record = manifest["n_items"], manifest.get("towers")
    if not isinstance(record, dict) or record.get("n_items") != n_items:
        found = record.get("n_items") if isinstance(record, dict) else None
        raise BundleError(
            f"manifest.json: towers record for {found} items, the bundle has {n_items}"
        )
    try:
        with safe_open(path / TOWERS_WEIGHTS, framework="numpy") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 (no __iter__)
            shapes = {name: (s.get_dtype(), s.get_shape()) for name, s in slices.items()}
    except SafetensorError as exc:
        raise BundleError(f"{TOWERS_WEIGHTS} cannot be loaded: bad header: {exc}") from exc
    tables = [k for k in shapes if k.endswith("item_embedding.weight")] + [
        k for k in shapes if k.endswith("prior_columns.weight")
    ]
    if not any(k.endswith("item_embedding.weight") for k in tables):
        raise BundleError(f"{TOWERS_WEIGHTS} has no item-id table")
    for name, (dtype, shape) in shapes.items():
        if dtype != "F32" or (name in tables and shape[:1] != [n_items + 1]):
            raise BundleError(
                f"{TOWERS_WEIGHTS}: {name} is {dtype} {shape}; a catalogue of {n_items} items "
                f"needs float32 tables of {n_items + 1} rows"
            )

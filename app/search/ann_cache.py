"""The on-disk ANN index cache: a built FAISS index kept beside its bundle, so a worker starts
in seconds, not minutes.

Building HNSW over 1M vectors takes minutes per worker; reading the built index takes about a
second. The cache lives in `<bundle>/index-cache/` (or `$INDEX_CACHE_DIR/<version>/` when the
bundle sits on a read-only volume), one file per (embeddings checksum, index kind and build
parameters), e.g. `hnsw-M32-efc200-3f9a1c0d2e4b5a69.faiss`, with a sidecar
`.json` holding the key and the file's sha256. It is verified like the bundle itself: a
cached file whose sidecar, checksum, key or shape does not match is ignored and rebuilt. That
catches corruption, not tampering: the sidecar sits beside the index, so whoever can write the
cache directory can replace both, and the directory must be as trusted as MODEL_DIR. Writes
are atomic (temp file + os.replace), and the cache is never required: an unwritable directory
just builds the index at every start.

Concurrent workers take an exclusive lock per cache file while they check and build, so on a
cold start one worker builds and the others wait for it and then read its result.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import faiss

from app.config import IndexConfig
from models.bundle import is_version_name, sha256_file

log = logging.getLogger(__name__)

CACHE_DIR = "index-cache"


def cache_dir(bundle_dir: Path, root: Path | None) -> Path:
    """Where a bundle's indexes are cached: `root/<version>/` when a cache root is set (the
    bundle volume may be read-only), else `<bundle>/index-cache/`."""
    return root / bundle_dir.name if root is not None else bundle_dir / CACHE_DIR


def prune(root: Path, keep: Collection[str]) -> None:
    """Remove the caches under the cache root (INDEX_CACHE_DIR) of the versions not in `keep`,
    those MODEL_DIR no longer holds: nothing loads them again, and each holds a built index
    (~0.5 GB at 1M items), so a root shared by retrained versions grew without end. Only
    directories named as versions are touched."""
    try:
        entries = [e for e in root.iterdir() if is_version_name(e.name) and e.name not in keep]
    except OSError:
        return
    for entry in entries:
        shutil.rmtree(entry, ignore_errors=True)
        log.info("removed the index cache of %s: it is no longer in MODEL_DIR", entry.name)


def _atomic_write(directory: Path, name: str, write: Callable[[str], object]) -> str:
    """`write(tmp_path)`, then rename over `directory/name`; returns the file's sha256."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        digest = sha256_file(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from workers run as other users
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return digest


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if needed); none where it cannot be created."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # read-only directory: nothing to coordinate, nobody can write a cache
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def cache_key(config: IndexConfig, checksum: str, n_items: int, dim: int) -> dict[str, Any]:
    """Everything a built index of `config` over the embeddings with `checksum` is a function
    of (search-time parameters are not: they are set after loading)."""
    params: dict[str, Any] = (
        {"hnsw_m": config.hnsw_m, "ef_construction": config.hnsw_ef_construction}
        if config.kind == "hnsw"
        else {"ivf_nlist": config.ivf_nlist}
    )
    key = {"embeddings_sha256": checksum, "n_items": n_items, "dim": dim, "kind": config.kind}
    return key | params


def cache_name(config: IndexConfig, checksum: str) -> str:
    """File stem of the cached index: kind, build parameters, embeddings checksum."""
    if config.kind == "hnsw":
        params = f"M{config.hnsw_m}-efc{config.hnsw_ef_construction}"
    else:
        params = f"nlist{config.ivf_nlist}"
    return f"{config.kind}-{params}-{checksum[:16]}"


class AnnIndexCache:
    """The cached index for one bundle and one index configuration.

    Args:
        directory: the bundle's cache directory (`cache_dir`), created when missing.
        name: file stem naming the index kind, its parameters and the embeddings checksum.
        key: everything the index is a function of; must equal the sidecar's.
    """

    def __init__(self, directory: Path, name: str, key: dict[str, Any]) -> None:
        self.dir = directory
        self.index_path = self.dir / f"{name}.faiss"
        self.sidecar_path = self.dir / f"{name}.json"
        self.key = key

    def load(self) -> faiss.Index | None:
        """The cached index, or None when absent or not verifiably ours."""
        if not self.index_path.is_file():
            return None
        try:
            meta = json.loads(self.sidecar_path.read_text())
            if meta.get("key") != self.key:
                raise ValueError(f"key {meta.get('key')} is not {self.key}")
            if sha256_file(self.index_path) != meta.get("sha256"):
                raise ValueError("checksum mismatch")
            index = faiss.read_index(str(self.index_path))
            if (index.ntotal, index.d) != (self.key["n_items"], self.key["dim"]):
                raise ValueError(f"index holds {index.ntotal} x {index.d}")
        except (OSError, ValueError, RuntimeError, AttributeError) as exc:
            log.warning("ignoring cached index %s: %s", self.index_path.name, exc)
            return None
        return index

    def store(self, index: faiss.Index) -> bool:
        """Write `index` and its sidecar; False (logged) when the directory is not writable."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            digest = _atomic_write(
                self.dir, self.index_path.name, lambda tmp: faiss.write_index(index, tmp)
            )
            meta = json.dumps({"key": self.key, "sha256": digest, "faiss": faiss.__version__})
            _atomic_write(self.dir, self.sidecar_path.name, lambda tmp: Path(tmp).write_text(meta))
        except (OSError, RuntimeError) as exc:
            log.info("index not cached (%s): %s", self.dir, exc)
            return False
        return True

    def load_or_build(self, build: Callable[[], faiss.Index]) -> tuple[faiss.Index, bool]:
        """The cached index if valid, else `build()` (cached for the next start); returns the
        index and whether it came from the cache."""
        index = self.load()
        if index is not None:
            return index, True
        lock = self.dir / f".{self.index_path.stem}.lock"
        with contextlib.suppress(OSError):
            self.dir.mkdir(parents=True, exist_ok=True)
        with _locked(lock):
            index = self.load()  # another worker may have built it while we waited
            if index is not None:
                return index, True
            index = build()
            if self.store(index):
                log.info("index cached in %s", self.index_path)
        return index, False

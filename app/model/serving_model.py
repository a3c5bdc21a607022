"""`ServingModel`: one model version as the service serves it: load, verify, warm up, encode.

`ServingModel.load` runs off the event loop (start-up and reload call it in a worker thread):
it verifies the bundle's files and shapes, loads the TorchScript user tower, builds (or reads
from its cache) the item index (`app.search.build_item_index`) and warms both up; every
failure becomes `BundleRejected` with the reason, so a bad bundle never replaces a good one.
The model it returns is ready and never changes: a reload loads another one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.config import IndexConfig
from app.errors import BundleRejected
from app.search import ItemIndex, build_item_index
from app.settings import IndexType
from models.bundle import ITEM_EMBEDDINGS, BundleError, VerifiedBundle, verify_bundle
from models.features import FeatureEncoder, FeatureSpecError


@dataclass(frozen=True)
class ServingModel:
    """One loaded, warmed-up model version; never mutated after construction.

    Attributes:
        version: the bundle's version name.
        path: its directory.
        manifest: parsed manifest.json.
        tower: TorchScript user tower: `Dict[str, Tensor]` -> float32 `(B, dim)`.
        encoder: the shared feature encoder (spec + item index for history).
        index: the item index the user vectors are searched in.
        item_ids: external id of each row of the index.
        loaded_at: UNIX time the model became ready.
    """

    version: str
    path: Path
    manifest: Mapping[str, Any]
    tower: torch.jit.ScriptModule
    encoder: FeatureEncoder
    index: ItemIndex
    item_ids: Sequence[str]
    loaded_at: float

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def dim(self) -> int:
        return self.index.dim

    @property
    def index_type(self) -> IndexType:
        return self.index.kind

    def encode(
        self,
        rows: Sequence[Mapping[str, Any]],
        histories: Sequence[Sequence[str]] | None = None,
        *,
        history_rows: Sequence[Sequence[int]] | None = None,
    ) -> np.ndarray:
        """Raw features + histories (item ids newest first, or their catalogue rows as
        `encoder.history_rows` maps them) -> float32 `(B, dim)` user vectors."""
        arrays = self.encoder.encode(rows, histories, history_rows=history_rows)
        with torch.inference_mode():
            out = self.tower({name: torch.from_numpy(a) for name, a in arrays.items()})
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    @classmethod
    def load(cls, path: Path, config: IndexConfig) -> ServingModel:
        """Verify, load, index and warm up the bundle in `path`.

        Raises:
            BundleRejected: with the reason, for anything that must not be served.
        """
        verified = _verify(path)
        item_index = {item: row for row, item in enumerate(verified.item_ids)}
        try:
            encoder = FeatureEncoder.from_json(verified.feature_spec, item_index)
        except (FeatureSpecError, AttributeError, TypeError, ValueError) as exc:
            raise BundleRejected(f"feature_spec.json: {exc}") from exc
        tower = _load_tower(verified.user_tower_path)
        embeddings = np.ascontiguousarray(verified.item_embeddings, dtype=np.float32)
        embeddings.setflags(write=False)
        if embeddings.shape[0] == 0:
            raise BundleRejected("the bundle has no items")
        checksum = verified.manifest["sha256"][ITEM_EMBEDDINGS]
        model = cls(
            version=verified.version,
            path=path,
            manifest=verified.manifest,
            tower=tower,
            encoder=encoder,
            index=build_item_index(embeddings, config, bundle_dir=path, checksum=checksum),
            item_ids=tuple(verified.item_ids),
            loaded_at=time.time(),
        )
        model.warm_up()
        return model

    def warm_up(self) -> None:
        """Encode a cold-start user and one with every feature's largest index and the last
        item as history (a tower whose tables are smaller than the spec and the catalogue
        fails here, not on a user's request), and search with them; TorchScript's profiling
        executor optimises on the first calls, so run a few before declaring the model ready.

        Raises:
            BundleRejected: the tower or the search failed, or gave the wrong shape.
        """
        rows = [{}, self.encoder.largest_row()]
        histories = [[], [self.item_ids[-1], self.item_ids[0]]]
        try:
            for batch in (1, 2, 1):
                vectors = self.encode(rows[:batch], histories[:batch])
                if vectors.shape != (batch, self.dim):
                    raise BundleRejected(
                        f"user tower returns shape {tuple(vectors.shape)}, item embeddings "
                        f"have dim {self.dim}"
                    )
                if not np.isfinite(vectors).all():
                    raise BundleRejected("user tower returns non-finite values on warm-up")
                self.index.search(vectors, min(10, self.n_items))
        except BundleRejected:
            raise
        except Exception as exc:  # a tower that cannot run the spec's inputs
            raise BundleRejected(f"warm-up failed: {type(exc).__name__}: {exc}") from exc


def _verify(path: Path) -> VerifiedBundle:
    """The bundle's files, checksums and shapes as `models.bundle` verifies them."""
    try:
        return verify_bundle(path)
    except BundleError as exc:
        raise BundleRejected(str(exc)) from exc
    except (OSError, EOFError, ValueError) as exc:  # unreadable or truncated files
        raise BundleRejected(f"cannot read the bundle: {type(exc).__name__}: {exc}") from exc


def _load_tower(path: Path) -> torch.jit.ScriptModule:
    try:
        tower = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, ValueError, zip errors...
        raise BundleRejected(f"user_tower.pt cannot be loaded: {exc}") from exc
    return tower.eval()

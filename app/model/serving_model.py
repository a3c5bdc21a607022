"""`ServingModel`: one model version as the service serves it: load, verify, warm up, encode.

`ServingModel.load` runs off the event loop (start-up and reload call it in a worker thread):
it verifies the bundle's files and shapes, loads the towers (`models.tower_format`), builds
(or reads from its cache) the item index (`app.search.build_item_index`) and warms them up;
every failure becomes `BundleRejected` with the reason, so a bad bundle never replaces a good
one. The model it returns is ready and never changes: a reload loads another one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.config import IndexConfig
from app.errors import BundleRejected, InvalidInput, ItemTowerUnavailable, Loc
from app.model.value_checks import attribute_errors
from app.search import ItemIndex, build_item_index
from app.search.overlay import EMPTY_OVERLAY, ItemOverlay
from app.settings import IndexType
from models import tower_format
from models.bundle import (
    ITEM_ATTRIBUTES,
    ITEM_EMBEDDINGS,
    BundleError,
    VerifiedBundle,
    verify_bundle,
)
from models.features import FeatureEncoder, FeatureSpecError
from models.item_attributes import ItemAttributes


@dataclass(frozen=True)
class ServingModel:
    """One loaded, warmed-up model version; never mutated after construction.

    Attributes:
        version: the bundle's version name.
        path: its directory.
        manifest: parsed manifest.json.
        tower: the user tower: `Dict[str, Tensor]` -> float32 `(B, dim)`.
        encoder: the shared feature encoder (spec + item index for history).
        index: the item index the user vectors are searched in.
        item_ids: external id of each row of the index.
        item_tower: the serving item tower (`models.serving_towers`); None in a format 1
            bundle.
        item_encoder: the item attributes' encoder (`item_feature_spec.json`); None likewise.
    """

    version: str
    path: Path
    manifest: Mapping[str, Any]
    tower: nn.Module
    encoder: FeatureEncoder
    index: ItemIndex
    item_ids: Sequence[str]
    item_tower: nn.Module | None = None
    item_encoder: FeatureEncoder | None = None
    # The catalogue's raw attribute values, which recall filters read; None when the bundle
    # has no item_attributes.npz (format 1 bundles, and those exported before it existed).
    item_attributes: ItemAttributes | None = None
    # Items added and deleted since the bundle was built (`app.catalogue` builds it; a model
    # with another overlay replaces this one as one reference, `ModelRepository.update`).
    overlay: ItemOverlay = field(default=EMPTY_OVERLAY, kw_only=True)

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

    def embed_items(
        self,
        rows: Sequence[Mapping[str, Any]],
        item_ids: Sequence[str],
        *,
        loc: Loc = ("items",),
    ) -> np.ndarray:
        """Raw item attributes (the item table's columns; a missing key is a missing value)
        and item ids -> float32 `(B, dim)`, the vectors the index would hold for them.

        A catalogue id reads its own item-id embedding and popularity prior (so a catalogue
        item with its attributes gives its row of the index); any other id the unknown-id
        embedding and the prior of an item with no interactions.

        Raises:
            ItemTowerUnavailable: the bundle (format 1) has no item tower.
            InvalidInput: unknown attribute names or values of the wrong type (422 entries at
                `(*loc, row, name)`).
        """
        if self.item_tower is None or self.item_encoder is None:
            raise ItemTowerUnavailable(
                f"bundle {self.version} (format {self.manifest.get('format_version')}) has no "
                "item tower, so items cannot be embedded; re-export it with the current "
                "trainer (bundle format 2)"
            )
        if len(rows) != len(item_ids):
            raise ValueError(f"{len(rows)} attribute rows for {len(item_ids)} item ids")
        errors = attribute_errors(self.item_encoder, rows, loc)
        if errors:
            raise InvalidInput(errors)
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        known = self.encoder.item_index
        catalogue = np.fromiter((known.get(i, -1) for i in item_ids), np.int64, len(item_ids))
        arrays = self.item_encoder.encode(rows)
        with torch.inference_mode():
            features = {name: torch.from_numpy(a) for name, a in arrays.items()}
            out = self.item_tower(torch.from_numpy(catalogue), features)
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
        tower, item_tower, item_encoder = _load_towers(verified)
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
            item_tower=item_tower,
            item_encoder=item_encoder,
            item_attributes=_load_attributes(verified),
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
            self._warm_up_items()
        except BundleRejected:
            raise
        except Exception as exc:  # a tower that cannot run the spec's inputs
            raise BundleRejected(f"warm-up failed: {type(exc).__name__}: {exc}") from exc

    def _warm_up_items(self) -> None:
        """Embed a new item with every attribute's largest index and the last catalogue item
        with no attributes: the item tower must give vectors of the index's width and norm."""
        if self.item_encoder is None:
            return
        for _ in range(3):
            vectors = self.embed_items(
                [self.item_encoder.largest_row(), {}], ["\x00new item", self.item_ids[-1]]
            )
        if vectors.shape != (2, self.dim):
            raise BundleRejected(
                f"item tower returns shape {tuple(vectors.shape)}, item embeddings have dim "
                f"{self.dim}"
            )
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
        unit = self.manifest.get("normalized") is not True or np.allclose(norms, 1.0, atol=1e-3)
        if not np.isfinite(vectors).all() or not unit:
            raise BundleRejected(f"item tower returns vectors of norms {norms.tolist()}")


def _load_attributes(verified: VerifiedBundle) -> ItemAttributes | None:
    """The bundle's item attributes when its manifest lists (and so verified) them."""
    if ITEM_ATTRIBUTES not in verified.manifest["sha256"]:
        return None
    try:
        attributes = ItemAttributes.load(verified.path / ITEM_ATTRIBUTES)
    except (OSError, ValueError) as exc:
        raise BundleRejected(f"{ITEM_ATTRIBUTES}: {type(exc).__name__}: {exc}") from exc
    if attributes.n_items != len(verified.item_ids):
        raise BundleRejected(
            f"{ITEM_ATTRIBUTES} holds {attributes.n_items} items, the bundle "
            f"{len(verified.item_ids)}"
        )
    return attributes


def _verify(path: Path) -> VerifiedBundle:
    """The bundle's files, checksums and shapes as `models.bundle` verifies them."""
    try:
        return verify_bundle(path)
    except BundleError as exc:
        raise BundleRejected(str(exc)) from exc
    except (OSError, EOFError, ValueError) as exc:  # unreadable or truncated files
        raise BundleRejected(f"cannot read the bundle: {type(exc).__name__}: {exc}") from exc


def _load_towers(
    verified: VerifiedBundle,
) -> tuple[nn.Module, nn.Module | None, FeatureEncoder | None]:
    """The user tower, and from format 2 on the item tower and its encoder."""
    try:
        towers = tower_format.load_towers(verified.path, verified.manifest)
    except tower_format.TowerLoadError as exc:
        raise BundleRejected(str(exc)) from exc
    if verified.item_feature_spec is None or towers.item is None:
        return towers.user, None, None
    try:
        item_encoder = FeatureEncoder.from_json(verified.item_feature_spec)
    except (FeatureSpecError, AttributeError, TypeError, ValueError) as exc:
        raise BundleRejected(f"item_feature_spec.json: {exc}") from exc
    return towers.user, towers.item, item_encoder

"""How a bundle stores its towers, and the one place that reads them back.

`save_towers` writes the serving user and item towers (`models.serving_towers`);
`load_towers` reads a verified bundle's towers back, whatever its format, for the service,
the bundle recommender and the tests alike:

- format 1 (`torchscript`): `user_tower.pt`, the scripted user tower alone (TorchScript is
  deprecated from torch 2.13 on); written only to test that such bundles still load.
- format 2 (`safetensors`): `towers.safetensors`, both towers' weights alone (the shared
  item-id table once), rebuilt by this package's own tower code from the manifest's `towers`
  record and the bundle's feature specs (docs/design.md, "Bundle format 2", says why).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models import bundle as b
from models.features import FeatureEncoder
from models.fields import module_key
from models.serving_towers import rebuild_towers
from models.tower_config import TowerConfig


class TowerLoadError(ValueError):
    """A tower file cannot be read back as the tower its manifest describes."""


@dataclass(frozen=True)
class Towers:
    """A bundle's serving towers.

    Attributes:
        user: `Dict[str, Tensor]` -> float32 `(B, dim)`.
        item: `(B,)` catalogue rows (-1 = not in the catalogue) + `Dict[str, Tensor]` ->
            float32 `(B, dim)`; None in a format 1 bundle.
    """

    user: nn.Module
    item: nn.Module | None


def towers_record(
    config: TowerConfig, n_items: int, user_prior: bool, inverse_norm: float | None
) -> dict[str, Any]:
    """The manifest's `towers` record: what rebuilding the towers from their weights needs
    besides the feature specs."""
    return {
        "architecture": asdict(config),
        "n_items": n_items,
        "user_prior_folded": user_prior,
        "item_prior_inverse_norm": inverse_norm,
    }


def save_towers(directory: Path, towers: Towers) -> None:
    """Write the towers' files to `directory`: format 2's `towers.safetensors`, or with no
    item tower format 1's `user_tower.pt` (a TorchScript user tower alone)."""
    if towers.item is None:
        torch.jit.save(torch.jit.script(towers.user), str(directory / b.USER_TOWER))
        return
    both = nn.ModuleDict({"user": towers.user, "item": towers.item})
    tensors: dict[str, Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in both.state_dict().items():
        # The item-id embedding is shared by both towers: stored once, tied again on load.
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            tensors[name] = tensor.contiguous()
    save_file(tensors, directory / b.TOWERS_WEIGHTS)
    # safetensors writes 0600: a service run as another user could not read it.
    (directory / b.TOWERS_WEIGHTS).chmod(0o644)


def load_towers(directory: Path, manifest: Mapping[str, Any], *, script: bool = True) -> Towers:
    """The towers of the verified bundle in `directory` with `manifest`.

    Towers rebuilt from their weights run scripted (`torch.jit.script` of the rebuilt module,
    which shares its weights): eager PyTorch costs 3-4x more per call on these small towers
    (docs/design.md, "Bundle format 2"); `script=False` keeps them eager (the benchmark's
    baseline, and the fallback of a torch without TorchScript).

    Raises:
        TowerLoadError: a file is not a tower of the manifest's format, or its weights do
            not fit the architecture the manifest records.
    """
    if manifest.get("format_version") == 1:
        return Towers(_load_script(directory / b.USER_TOWER), None)
    tower_format = manifest.get("tower_format")
    if tower_format not in b.TOWER_FILES:
        raise TowerLoadError(f"unknown tower format {tower_format!r}")
    user, item = _load_weights(directory, manifest)
    if script and hasattr(torch, "jit"):
        try:
            user, item = torch.jit.script(user), torch.jit.script(item)
        except RuntimeError as exc:  # what the manifest records does not script
            raise TowerLoadError(f"the towers cannot be scripted: {exc}") from exc
    return Towers(user, item)


# Weights of at least this many elements stay in the file's memory map: the id tables, whose
# rows the towers gather and never multiply whole. Their pages are the page cache's, shared by
# every worker serving the bundle and read in only when touched (the 1M-item table is 128 MB).
# Smaller weights are copied out: safetensors aligns tensors to 8 bytes only, and the
# sequential tower ran 3 % slower with all its weights mapped than on torch's own memory.
MAPPED_MIN_ELEMENTS = 1 << 20


def _load_weights(directory: Path, manifest: Mapping[str, Any]) -> tuple[nn.Module, nn.Module]:
    try:
        record = manifest["towers"]
        architecture = dict(record["architecture"])
        config = TowerConfig(**architecture | {"hidden": tuple(architecture["hidden"])})
        inverse_norm = record["item_prior_inverse_norm"]
        if inverse_norm is not None and not _positive_number(inverse_norm):
            raise ValueError(f"item_prior_inverse_norm {inverse_norm!r}")
        user_encoder = _encoder(directory / b.FEATURE_SPEC)
        item_encoder = _encoder(directory / b.ITEM_FEATURE_SPEC)
        user, item = rebuild_towers(
            config,
            user_encoder,
            item_encoder,
            int(record["n_items"]),
            user_prior=bool(record["user_prior_folded"]),
            inverse_norm=inverse_norm,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TowerLoadError(f"manifest.json: bad towers record: {exc!r}") from exc
    try:
        mapped = load_file(directory / b.TOWERS_WEIGHTS)  # over the file's (private) memory map
        renames = _legacy_keys([f.name for f in (*user_encoder.features, *item_encoder.features)])
        weights = {
            _renamed(k, renames): v if v.numel() >= MAPPED_MIN_ELEMENTS else v.clone()
            for k, v in mapped.items()
        }
        both = nn.ModuleDict({"user": user, "item": item})
        unexpected = both.load_state_dict(weights, strict=False, assign=True).unexpected_keys
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise TowerLoadError(f"{b.TOWERS_WEIGHTS} cannot be loaded: {exc}") from exc
    if unexpected:
        raise TowerLoadError(f"{b.TOWERS_WEIGHTS} holds unknown weights: {unexpected[:5]}")
    # A weight the export never wrote (the trainer's checks refuse non-finite towers), whose
    # rows a warm-up may not touch: a NaN history row would answer scores of null. One NaN or
    # infinity makes the sum non-finite: 20 ms over a 1M-item table, an element-wise check 420.
    broken = [k for k, t in weights.items() if t.is_floating_point() and not t.sum().isfinite()]
    if broken:
        raise TowerLoadError(f"{b.TOWERS_WEIGHTS} holds non-finite weights: {broken[:5]}")
    # Every weight must now be one of the file's: a name the file left out is the shared
    # table's other name, filled through the one stored; any other kept its initial value.
    stored = {t.untyped_storage().data_ptr() for t in weights.values()}
    empty = [
        n for n, t in both.state_dict().items() if t.untyped_storage().data_ptr() not in stored
    ]
    if empty:
        raise TowerLoadError(f"{b.TOWERS_WEIGHTS} lacks weights: {', '.join(empty[:5])}")
    return user.eval(), item.eval()


def _legacy_keys(names: Sequence[str]) -> dict[str, str]:
    """Bundles written before `module_key` escaped names starting with "~" (7310448) keyed
    such a field by its name as it was: those keys -> today's, for each such name that no
    other name of the bundle is keyed by today (then the bundle is today's)."""
    today = {module_key(n) for n in names}
    return {n: module_key(n) for n in names if n.startswith("~") and n not in today}


def _renamed(weight: str, renames: Mapping[str, str]) -> str:
    """`weight`'s name with each field key in `renames` (`_legacy_keys`) renamed."""
    if not renames:
        return weight
    parts = weight.split(".")
    return ".".join(
        renames.get(part, part) if i and parts[i - 1] == "fields" else part
        for i, part in enumerate(parts)
    )


def _encoder(path: Path) -> FeatureEncoder:
    # The towers read only the features and the history length: no item index needed.
    return FeatureEncoder.from_json(json.loads(path.read_text()), {})


def _load_script(path: Path) -> nn.Module:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, ValueError, zip errors...
        raise TowerLoadError(f"{path.name} cannot be loaded: {exc}") from exc
    return module.eval()


def _positive_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value > 0

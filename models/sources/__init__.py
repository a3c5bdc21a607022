"""Data sources: turn a SOURCE string into a `Dataset`.

SOURCE forms:

- `synthetic`, `synthetic:S` (seed S) or `synthetic:seed=S,users=U,items=I,topics=T,per_user=N`
  (any subset of the keys): the built-in generator, see `models.sources.synthetic`;
- `ml-1m:DIR`: MovieLens-1M `ratings.dat`, `users.dat`, `movies.dat`;
- `ml-100k:DIR`: MovieLens-100K, GroupLens `u.data`/`u.user`/`u.item` or RecBole atomic
  `*.inter`/`*.user`/`*.item`;
- `csv:DIR`: files described by `DIR/schema.json`, see `models.sources.csv`.
"""

from __future__ import annotations

from pathlib import Path

from models.dataset import DataError, Dataset
from models.sources.csv import load_csv
from models.sources.movielens import load_ml_1m, load_ml_100k
from models.sources.synthetic import SyntheticConfig, generate

__all__ = ["SOURCE_FORMS", "SyntheticConfig", "load_dataset", "parse_synthetic"]

SOURCE_FORMS = (
    "synthetic",
    "synthetic:SEED",
    "synthetic:seed=S,users=U,items=I,topics=T,per_user=N",
    "ml-1m:DIR",
    "ml-100k:DIR",
    "csv:DIR",
)
_DIRECTORY_LOADERS = {"ml-1m": load_ml_1m, "ml-100k": load_ml_100k, "csv": load_csv}
_SYNTHETIC_KEYS = ("seed", "users", "items", "topics", "per_user")


def load_dataset(source: str) -> Dataset:
    """Load the dataset a SOURCE string names.

    Args:
        source: e.g. "synthetic:seed=3,users=500", "ml-1m:/data/ml-1m", "csv:./mydata".

    Returns:
        The dataset, with `name` set to `source`.

    Raises:
        DataError: unknown scheme, bad parameter, or a problem with the data itself.

    Example:
        >>> load_dataset("synthetic:seed=1,users=50,items=40").summary()["n_items"]
        40
    """
    scheme, _, argument = source.strip().partition(":")
    if scheme == "synthetic":
        return generate(parse_synthetic(argument), source)
    loader = _DIRECTORY_LOADERS.get(scheme)
    if loader is None:
        raise DataError(f"unknown data source {source!r}; valid forms: {', '.join(SOURCE_FORMS)}")
    if not argument:
        raise DataError(f"{scheme} needs a directory: {scheme}:DIR")
    directory = Path(argument).expanduser()
    if not directory.is_dir():
        raise DataError(f"{source!r}: {directory} is not a directory")
    return loader(directory, source)


def parse_synthetic(argument: str) -> SyntheticConfig:
    """Parse what follows `synthetic:` ("", "3" or "seed=3,users=2000,...").

    Args:
        argument: the parameter part of the SOURCE string.

    Raises:
        DataError: unknown key, repeated key or a value that is not an integer.
    """
    if not argument:
        return SyntheticConfig()
    if "=" not in argument:
        return SyntheticConfig(seed=_integer("seed", argument))
    values: dict[str, int] = {}
    for part in argument.split(","):
        key, sep, value = (p.strip() for p in part.partition("="))
        if not sep or key not in _SYNTHETIC_KEYS:
            raise DataError(
                f"synthetic: bad parameter {part!r}; expected key=value with key in "
                f"{', '.join(_SYNTHETIC_KEYS)}, e.g. synthetic:seed=3,users=2000,items=500"
            )
        if key in values:
            raise DataError(f"synthetic: {key} given twice")
        values[key] = _integer(key, value)
    return SyntheticConfig(**values)


def _integer(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"synthetic: {key} must be an integer, got {value!r}") from None

"""Datasets as in-memory uint8 tensors: MedMNIST, MNIST and user image folders.

``load_dataset(name, ...)`` is the one entry point. ``name`` is a MedMNIST flag or alias
(``derma``, ``skin``, ``organa``, ``path``, ``breast`` …), ``mnist``, or a path to an image
folder (one sub-folder per class).
"""

from __future__ import annotations

import os
from pathlib import Path

from zoo.data.base import ArrayDataset, DataSplits, convert_channels, resplit
from zoo.data.medmnist_data import load_medmnist
from zoo.errors import DataUnavailableError
from zoo.names import ALIASES, FOLDER_DATASETS, resolve_name

__all__ = [
    "ALIASES",
    "FOLDER_DATASETS",
    "ArrayDataset",
    "DataSplits",
    "DataUnavailableError",
    "convert_channels",
    "default_data_root",
    "load_dataset",
    "resolve_name",
    "resplit",
]


def default_data_root() -> Path:
    """``$MEDZOO_DATA``, else MedMNIST's own default ``~/.medmnist``."""
    return Path(os.environ.get("MEDZOO_DATA", Path.home() / ".medmnist")).expanduser()


def load_dataset(
    name: str,
    size: int = 28,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    in_channels: int | None = None,
) -> DataSplits:
    """Load train/val/test splits into memory. ``in_channels`` converts grey↔RGB if given."""
    canonical = resolve_name(name)
    data_root = Path(root).expanduser() if root is not None else default_data_root()
    if canonical == "mnist":
        from zoo.data.mnist import load_mnist

        splits = load_mnist(data_root, download=download)
    elif canonical.startswith("folder:") or canonical in FOLDER_DATASETS:
        from zoo.data.folders import load_folder

        if canonical in FOLDER_DATASETS:
            if root is None:
                raise DataUnavailableError(
                    f"{canonical} is an image-folder dataset: pass --data-root pointing at "
                    f"{FOLDER_DATASETS[canonical]}"
                )
            folder, label = data_root, canonical
        else:
            folder, label = Path(canonical[7:]), canonical
        splits = load_folder(folder, size=size, in_channels=in_channels or 3, name=label)
    else:
        splits = load_medmnist(canonical, size=size, root=data_root, download=download)
    if in_channels is not None and in_channels != splits.in_channels:
        splits = convert_channels(splits, in_channels)
    return splits

"""User image folders (ISIC-style): one sub-folder per class.

Either ``ROOT/<class>/*`` (split deterministically, stratified, 70/15/15 by a hash of each
file's relative path, so adding files never moves the others) or ``ROOT/{train,val,test}/<class>/*``
(the user's own split). Images are decoded once with :func:`zoo.preprocess.load_image` and held in
memory at ``size`` px.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from zoo.data.base import ArrayDataset, DataSplits
from zoo.errors import DataUnavailableError
from zoo.preprocess import ImageError, Preprocessing, load_image

log = logging.getLogger(__name__)

SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}


def _split_of(rel: str) -> str:
    """Deterministic split from the file's relative path."""
    u = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") / 2**64
    if u < SPLIT_FRACTIONS["train"]:
        return "train"
    return "val" if u < SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["val"] else "test"


def _files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


def load_folder(root: Path, size: int, in_channels: int = 3, name: str | None = None) -> DataSplits:
    if not root.is_dir():
        raise DataUnavailableError(f"image folder {root} does not exist")
    presplit = all((root / s).is_dir() for s in ("train", "val", "test"))
    class_root = root / "train" if presplit else root
    classes = sorted(p.name for p in class_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataUnavailableError(f"{class_root} needs one sub-folder per class (found {len(classes)})")
    prep = Preprocessing(size, size, in_channels, (0.0,) * in_channels, (1.0,) * in_channels)
    items: dict[str, list[tuple[Path, int]]] = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(classes):
        if presplit:
            for split in items:
                items[split] += [(p, label) for p in _files(root / split / cls)]
        else:
            for p in _files(root / cls):
                items[_split_of(str(p.relative_to(root)))].append((p, label))
    h = hashlib.sha256()
    out: dict[str, ArrayDataset] = {}
    skipped: list[str] = []
    for split, files in items.items():
        arrays, labels = [], []
        for path, label in files:
            data = path.read_bytes()
            try:
                arrays.append(load_image(data, prep))
            except ImageError as e:
                skipped.append(f"{path}: {e}")
                continue
            labels.append(label)
            h.update(str(path.relative_to(root)).encode() + hashlib.sha256(data).digest())
        if not arrays:
            raise DataUnavailableError(f"no readable images for the {split} split under {root}")
        out[split] = ArrayDataset(
            torch.from_numpy(np.stack(arrays)), torch.tensor(labels, dtype=torch.int64)
        )
    for line in skipped:
        log.warning("skipped unreadable image %s", line)
    return DataSplits(
        name=name or f"folder:{root}",
        task="binary-class" if len(classes) == 2 else "multi-class",
        labels=classes,
        image_size=size,
        in_channels=in_channels,
        checksum=h.hexdigest(),
        source=f"folder:{root}",
        split="user folders" if presplit else "hash 70/15/15",
        **out,
    )

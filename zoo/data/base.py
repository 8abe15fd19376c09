"""Containers shared by every dataset source."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from zoo.errors import UsageError


@dataclass
class ArrayDataset:
    """A split held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        self.labels = self.labels.reshape(-1).to(torch.int64)  # (N,) or (N, 1) both accepted
        if len(self.labels) != len(self.images):
            raise ValueError("images and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_numpy(cls, images: np.ndarray, labels: np.ndarray) -> ArrayDataset:
        """MedMNIST layout in: (N, H, W) grey or (N, H, W, 3) RGB; labels (N,) or (N, 1)."""
        if images.ndim == 3:
            images = images[:, None]
        elif images.ndim == 4 and images.shape[-1] in (1, 3):
            images = images.transpose(0, 3, 1, 2)
        else:
            raise ValueError(f"unexpected image array shape {images.shape}")
        return cls(
            torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
            torch.from_numpy(np.asarray(labels).reshape(-1).astype(np.int64)),
        )

    def subset(self, index: torch.Tensor) -> ArrayDataset:
        return ArrayDataset(self.images[index], self.labels[index])


@dataclass
class DataSplits:
    """Train / val / test with what a checkpoint card needs to know about them."""

    name: str  # canonical: MedMNIST flag, "mnist" or "folder:<path>"
    task: str  # "multi-class" or "binary-class"
    labels: list[str]
    image_size: int
    in_channels: int
    checksum: str  # sha256 of the source file(s)
    source: str  # where it came from, for the card
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    split: str = "official"

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def describe(self) -> dict[str, object]:
        """The card's view of the data."""
        return {
            "name": self.name,
            "task": self.task,
            "labels": self.labels,
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "checksum": self.checksum,
            "source": self.source,
            "split": self.split,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
        }


def _luma(images: torch.Tensor) -> torch.Tensor:
    """RGB → L exactly as Pillow does (ITU-R 601-2, integer arithmetic with rounding)."""
    r, g, b = (images[:, i].to(torch.int32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)[:, None]


def convert_channels(splits: DataSplits, in_channels: int) -> DataSplits:
    """Grey → RGB (repeat) or RGB → grey (luma), the same rule as ``zoo.preprocess``."""

    def conv(ds: ArrayDataset) -> ArrayDataset:
        if in_channels == 3:
            return ArrayDataset(ds.images.expand(-1, 3, -1, -1).contiguous(), ds.labels)
        return ArrayDataset(_luma(ds.images), ds.labels)

    return dataclasses.replace(
        splits,
        in_channels=in_channels,
        train=conv(splits.train),
        val=conv(splits.val),
        test=conv(splits.test),
    )


def resplit(splits: DataSplits, val_fraction: float, seed: int) -> DataSplits:
    """Carve a stratified validation split from train (the reports' 80/20 or 85/15 splits).

    The official validation split is left out so that the test split stays untouched.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UsageError("val_fraction must be in (0, 1)")
    g = torch.Generator().manual_seed(seed)
    labels = splits.train.labels
    val_idx: list[torch.Tensor] = []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val_idx.append(idx[: max(1, round(len(idx) * val_fraction))])
    val = torch.cat(val_idx).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val] = False
    return dataclasses.replace(
        splits,
        train=splits.train.subset(torch.nonzero(mask).flatten()),
        val=splits.train.subset(val),
        split=f"train carved {1 - val_fraction:.0%}/{val_fraction:.0%} (seed {seed})",
    )

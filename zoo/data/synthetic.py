"""Small synthetic files in the exact MedMNIST npz format, for tests and benchmarks.

Keys ``train_images``, ``train_labels``, ``val_*``, ``test_*``; images uint8 (N, H, W) for grey
flags and (N, H, W, 3) for RGB ones, labels uint8 (N, 1): as the real files. Each class gets its
own brightness pattern plus noise, so a model can learn it.
"""

from __future__ import annotations

from pathlib import Path

import medmnist
import numpy as np

from zoo.data.medmnist_data import npz_name


def synthetic_arrays(n: int, n_classes: int, size: int, channels: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, n_classes, size=n)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = np.empty((n, size, size, channels), dtype=np.float64)
    for c in range(n_classes):
        angle = np.pi * c / n_classes
        pattern = 0.5 + 0.4 * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) * 2)
        idx = labels == c
        imgs[idx] = pattern[None, :, :, None]
    imgs += rng.normal(0, 0.15, imgs.shape)
    imgs = np.clip(imgs * 255, 0, 255).astype(np.uint8)
    if channels == 1:
        imgs = imgs[..., 0]
    return imgs, labels.astype(np.uint8).reshape(-1, 1)


def write_synthetic_medmnist(
    root: str | Path, flag: str, size: int = 28, n: tuple[int, int, int] = (200, 60, 60), seed: int = 0
) -> Path:
    """Write ``<root>/<flag>[_size].npz`` shaped like the real file; returns its path."""
    info = medmnist.INFO[flag]
    n_classes, channels = len(info["label"]), int(info["n_channels"])
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = synthetic_arrays(count, n_classes, size, channels, rng)
    path = Path(root) / npz_name(flag, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def square_arrays(n: int, size: int, rng: np.random.Generator, side: int | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A task whose label is where to look: grey noise images (N, size, size), label 1 when a bright
    square of ``side`` pixels (default size // 5) sits somewhere in the image, 0 when there is none.
    Returns images, labels (N, 1) and each square's box ``(top, left, bottom, right)``
    (bottom/right exclusive; -1 for the images without one)."""
    side = side or max(2, size // 5)
    labels = rng.integers(0, 2, size=n)
    imgs = np.clip(rng.normal(70, 25, (n, size, size)), 0, 255)
    boxes = np.full((n, 4), -1, dtype=np.int64)
    for i in np.flatnonzero(labels):
        top, left = rng.integers(1, size - side - 1, size=2)
        imgs[i, top:top + side, left:left + side] = rng.normal(215, 10, (side, side))
        boxes[i] = (top, left, top + side, left + side)
    return np.clip(imgs, 0, 255).astype(np.uint8), labels.astype(np.uint8).reshape(-1, 1), boxes


def write_square_medmnist(root: str | Path, size: int = 28, n: tuple[int, int, int] = (400, 100, 100),
                          seed: int = 0, flag: str = "breastmnist") -> tuple[Path, dict[str, np.ndarray]]:
    """The square task as ``<root>/<flag>[_size].npz`` (a grey binary MedMNIST flag), and the boxes
    of each split (``{"train": (N, 4), ...}``, see :func:`square_arrays`)."""
    info = medmnist.INFO[flag]
    if int(info["n_channels"]) != 1 or len(info["label"]) != 2:
        raise ValueError(f"{flag} is not a grey binary MedMNIST flag")
    rng = np.random.default_rng(seed)
    arrays, boxes = {}, {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"], arrays[f"{split}_labels"], boxes[split] = square_arrays(count, size, rng)
    path = Path(root) / npz_name(flag, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path, boxes

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

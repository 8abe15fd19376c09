"""MedMNIST 2D datasets through the ``medmnist`` package (every flag, sizes 28/64/128/224)."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import medmnist
import numpy as np

from zoo.data.base import ArrayDataset, DataSplits
from zoo.errors import DataUnavailableError, UsageError
from zoo.io import sha256_of

SIZES = (28, 64, 128, 224)

def npz_name(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def _download_hint(flag: str, size: int, root: Path, reason: str) -> str:
    info = medmnist.INFO[flag]
    url = info["url"] if size == 28 else info[f"url_{size}"]
    return (
        f"{npz_name(flag, size)} is not in {root} and could not be downloaded ({reason}); "
        f"get it from {url.split('?')[0]} (MedMNIST v2/v3 on Zenodo) and put it in {root}, "
        "or point --data-root / MEDZOO_DATA at the folder holding it"
    )


def load_medmnist(flag: str, size: int, root: Path, download: bool = True) -> DataSplits:
    """Load the official splits of one MedMNIST 2D dataset into memory."""
    if size not in SIZES:
        raise UsageError(f"MedMNIST comes in sizes {SIZES}, not {size}")
    info = medmnist.INFO[flag]
    if info["task"] not in ("multi-class", "binary-class", "ordinal-regression"):
        raise UsageError(f"{flag} is a {info['task']} task; medzoo trains single-label classifiers")
    path = root / npz_name(flag, size)
    cls = getattr(medmnist, info["python_class"])
    if not path.exists():
        if not download:
            raise DataUnavailableError(_download_hint(flag, size, root, "downloads disabled"))
        try:
            root.mkdir(parents=True, exist_ok=True)
            cls(split="train", root=str(root), size=size, download=True)
        except (URLError, OSError, RuntimeError) as e:
            path.unlink(missing_ok=True)  # never leave a partial download behind
            cause = e.__context__ or e  # medmnist wraps the network error in a long RuntimeError
            text = str(cause).strip()
            reason = text.splitlines()[0][:80] if text else type(cause).__name__
            raise DataUnavailableError(_download_hint(flag, size, root, reason)) from None
    try:
        parts = {
            split: cls(split=split, root=str(root), size=size, download=False)
            for split in ("train", "val", "test")
        }
    except (OSError, ValueError, KeyError) as e:
        raise DataUnavailableError(f"{path} is not a readable MedMNIST file: {e}") from None
    data = {s: ArrayDataset.from_numpy(np.asarray(d.imgs), np.asarray(d.labels)) for s, d in parts.items()}
    labels = [info["label"][str(i)] for i in range(len(info["label"]))]
    task = "binary-class" if len(labels) == 2 else "multi-class"
    return DataSplits(
        name=flag,
        task=task,
        labels=labels,
        image_size=size,
        in_channels=data["train"].images.shape[1],
        checksum=sha256_of(path),
        source=f"medmnist:{npz_name(flag, size)}",
        train=data["train"],
        val=data["val"],
        test=data["test"],
    )

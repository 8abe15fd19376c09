"""MNIST through torchvision (report 001's warm-up), 10 % of train held out for validation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from zoo.data.base import ArrayDataset, DataSplits, resplit
from zoo.errors import DataUnavailableError

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"


def load_mnist(root: Path, download: bool = True) -> DataSplits:
    from torchvision.datasets import MNIST

    try:
        train = MNIST(str(root), train=True, download=download)
        test = MNIST(str(root), train=False, download=download)
    except (RuntimeError, OSError) as e:
        raise DataUnavailableError(
            f"MNIST is not in {root / 'MNIST' / 'raw'} and could not be downloaded "
            f"({str(e).splitlines()[0][:80]}); get the four *-ubyte.gz files from {MNIST_URL} "
            "and put them there, or point --data-root at the folder holding MNIST/"
        ) from None
    h = hashlib.sha256()
    for t in (train.data, train.targets, test.data, test.targets):
        h.update(t.numpy().tobytes())
    full_train = ArrayDataset(train.data[:, None].contiguous(), train.targets.to(torch.int64))
    splits = DataSplits(
        name="mnist",
        task="multi-class",
        labels=[str(i) for i in range(10)],
        image_size=28,
        in_channels=1,
        checksum=h.hexdigest(),
        source="torchvision:MNIST",
        train=full_train,
        val=full_train,
        test=ArrayDataset(test.data[:, None].contiguous(), test.targets.to(torch.int64)),
    )
    return resplit(splits, val_fraction=0.1, seed=0)

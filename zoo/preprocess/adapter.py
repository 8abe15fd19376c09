"""The torch half of preprocessing: :class:`InputAdapter`, inside every trained, exported and
served model; :class:`FlipTTA`, the test-time augmentation a card may ask for; and the
normalisation statistics of a train split."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import UsageError
from zoo.preprocess.spec import Preprocessing


def normalisation_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) of a uint8 NCHW tensor, e.g. a train split."""
    x = images.to(torch.float64).div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


class InputAdapter(nn.Module):
    """uint8 (or [0, 1] float) NCHW at ``image_size`` → normalised float at ``input_size``."""

    def __init__(self, prep: Preprocessing) -> None:
        super().__init__()
        self.input_size = prep.input_size
        shape = (1, prep.in_channels, 1, 1)
        self.register_buffer("mean", torch.tensor(prep.mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(prep.std, dtype=torch.float32).view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        else:
            x = x.float()
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            # No antialias: the usual case is upsampling (28 px data, 224 px network), and plain
            # bilinear exports to every ONNX runtime.
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        return (x - self.mean) / self.std


# flip name → the image axis it reverses (NCHW)
FLIP_DIMS = {"hflip": -1, "vflip": -2}


class FlipTTA(nn.Module):
    """Test-time augmentation: the mean of the network's logits over the image and its flips.

    ``flips`` ⊆ {"hflip", "vflip"}; every combination is a view (``["hflip", "vflip"]``: the image,
    flipped left-right, upside down, and both). The views run as one batch (eval mode: BatchNorm
    uses its running statistics, so images do not affect each other). Averaging logits, then the
    one softmax / sigmoid rule of :mod:`zoo.postprocess`, is the rule of :func:`zoo.ensemble.combine`.
    Inside the exported model, so ONNX, TorchScript, serving and scoring all apply it.
    """

    def __init__(self, net: nn.Module, flips: Sequence[str]) -> None:
        super().__init__()
        unknown = sorted(set(flips) - set(FLIP_DIMS))
        if unknown or not flips:
            raise UsageError(f"test-time augmentation takes flips among {sorted(FLIP_DIMS)}, not {list(flips)}")
        self.net = net
        self.flips = sorted(set(flips), key=list(FLIP_DIMS).index)
        dims = [FLIP_DIMS[f] for f in self.flips]
        # every subset of the flips; the empty one is the image itself
        self.views: list[list[int]] = [list(c) for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        batch = torch.cat([x.flip(d) if d else x for d in self.views])
        return self.net(batch).unflatten(0, (len(self.views), n)).mean(0)


def full_model(net: nn.Module, prep: Preprocessing, tta: Sequence[str] = ()) -> nn.Sequential:
    """The served / exported model: preprocessing adapter followed by the network, wrapped in
    :class:`FlipTTA` when the card asks for test-time augmentation."""
    return nn.Sequential(InputAdapter(prep), FlipTTA(net, tta) if tta else net)

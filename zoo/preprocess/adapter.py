"""The torch half of preprocessing: :class:`InputAdapter`, inside every trained, exported and
served model, and the normalisation statistics of a train split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


def full_model(net: nn.Module, prep: Preprocessing) -> nn.Sequential:
    """The served / exported model: preprocessing adapter followed by the network."""
    return nn.Sequential(InputAdapter(prep), net)

"""LeNet-style CNNs: ``lenet`` (report 000, DermaMNIST) and ``lenet_binary`` (report 004).

``lenet``: conv in→6 k5 p2, ReLU, max pool 2; conv 6→16 k5 p2, ReLU, adaptive max pool 7×7
(any input size gives 16·7·7 = 784 features); four fully connected layers 784→256→128→64→classes
with ReLU and dropout 0.5 between them. The adaptive max pool is :class:`AdaptiveMaxPool2d`,
which computes PyTorch's windows in Python from the (fixed) feature-map size: the ONNX exporter
cannot convert ``nn.AdaptiveMaxPool2d`` when the size is not a multiple of 7 (64 and 128 px).

``lenet_binary``: the Keras model of report 004 (binary skin lesions, 128 px grey): conv 32 k3
same, ReLU, max pool; conv 64 k3 same, ReLU, max pool; dense 64 ReLU; dense out. The report's
single sigmoid output is ``num_classes=1`` logit here (4,213,249 parameters at 128 px grey, as in
the report's summary table). The flattened size is ``64 · (input_size // 4)²``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdaptiveMaxPool2d(nn.Module):
    """``nn.AdaptiveMaxPool2d(size)`` with the same windows, exportable to ONNX at any input size.

    Window ``i`` of ``n`` over a side of length ``h`` is ``[floor(i·h/n), ceil((i+1)·h/n))``; a
    max over a rectangle is a max over rows then over columns.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` → ``(N, C, size, size)``."""
        n = self.size
        h, w = x.shape[-2], x.shape[-1]
        if h % n == 0 and w % n == 0:
            return F.adaptive_max_pool2d(x, n)
        rows = [x[..., (i * h) // n : -(-(i + 1) * h // n), :].amax(dim=-2) for i in range(n)]
        x = torch.stack(rows, dim=-2)
        cols = [x[..., (j * w) // n : -(-(j + 1) * w // n)].amax(dim=-1) for j in range(n)]
        return torch.stack(cols, dim=-1)


def build_lenet(
    num_classes: int,
    in_channels: int,
    input_size: int,
    pretrained: bool | str = False,
    *,
    dropout: float = 0.5,
) -> nn.Module:
    """LeNet of report 000; ``dropout`` is applied after each hidden FC layer."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5, padding=2),
        nn.ReLU(),
        AdaptiveMaxPool2d(7),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 256),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(64, num_classes),
    )


def build_lenet_binary(
    num_classes: int,
    in_channels: int,
    input_size: int,
    pretrained: bool | str = False,
    *,
    base: int = 32,
    dense: int = 64,
) -> nn.Module:
    """Report 004's LeNet; ``base`` is the first conv's width (the second has twice as many)."""
    side = input_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, base, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(base, 2 * base, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * base * side * side, dense),
        nn.ReLU(),
        nn.Linear(dense, num_classes),
    )

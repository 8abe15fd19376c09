"""The ISIC 2019 CNN of report 003.

conv 3→16 k5, ReLU, max pool 2; conv 16→32 k5, ReLU, max pool 2; FC →1200 →840 →classes with
ReLU. At 224 px the flattened size is 32·53·53 = 89,888 as in the report; for other sizes it is
computed as ``32 · s²`` with ``s = ((input_size - 4) // 2 - 4) // 2`` (valid convolutions), so
any input of 16 px or more works.
"""

from __future__ import annotations

from torch import nn


def flat_side(input_size: int) -> int:
    """Side of the last feature map (53 at 224 px)."""
    return ((input_size - 4) // 2 - 4) // 2


def build_isic_cnn(
    num_classes: int, in_channels: int, input_size: int, pretrained: bool | str = False
) -> nn.Module:
    """Report 003's CNN, its FC input computed from ``input_size``."""
    side = flat_side(input_size)
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(16, 32, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(32 * side * side, 1200),
        nn.ReLU(),
        nn.Linear(1200, 840),
        nn.ReLU(),
        nn.Linear(840, num_classes),
    )

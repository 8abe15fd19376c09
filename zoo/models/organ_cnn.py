"""The OrganAMNIST CNNs of report 002 (``cnn28`` and ``cnn128``).

The report gives their shape and size but not their layers; these defaults reproduce both:

``cnn28``: 2 convs k3 same (32, 64), each ReLU + max pool 2, one hidden FC of 100 units, the
output layer: 333,627 parameters at 28 px grey with 11 classes (report: 3.3e5).

``cnn128``: ``n_convs`` convs k3 same with a constant ``channels`` width and no pooling (the
report found pooling unhelpful), then ``fc_layers`` hidden FC layers of ``hidden`` (286) units:
1.126e8 parameters at 128 px grey with 11 classes (report: 1.1e8). The flattened size is
``channels · input_size²``, so the first FC layer grows with the input (3.4e8 parameters at
224 px); it builds at any size.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from zoo.errors import UsageError


def build_cnn28(
    num_classes: int,
    in_channels: int,
    input_size: int,
    pretrained: bool | str = False,
    *,
    channels: Sequence[int] = (32, 64),
    hidden: int = 100,
    pool: bool = True,
) -> nn.Module:
    """Report 002's 28 px CNN; ``pool=False`` drops the two max pools."""
    if len(channels) != 2:
        raise UsageError(f"cnn28: channels must hold 2 widths, got {list(channels)}")
    c1, c2 = (int(c) for c in channels)
    side = input_size // 4 if pool else input_size
    layers: list[nn.Module] = [nn.Conv2d(in_channels, c1, kernel_size=3, padding=1), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.Conv2d(c1, c2, kernel_size=3, padding=1), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [
        nn.Flatten(),
        nn.Linear(c2 * side * side, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    ]
    return nn.Sequential(*layers)


def build_cnn128(
    num_classes: int,
    in_channels: int,
    input_size: int,
    pretrained: bool | str = False,
    *,
    channels: int = 24,
    n_convs: int = 2,
    hidden: int = 286,
    fc_layers: int = 3,
) -> nn.Module:
    """Report 002's 128 px CNN."""
    if n_convs < 1 or fc_layers < 0 or channels < 1 or hidden < 1:
        raise UsageError("cnn128: channels, n_convs and hidden must be >= 1, fc_layers >= 0")
    layers: list[nn.Module] = []
    cin = in_channels
    for _ in range(n_convs):
        layers += [nn.Conv2d(cin, channels, kernel_size=3, padding=1), nn.ReLU()]
        cin = channels
    layers.append(nn.Flatten())
    width = channels * input_size * input_size
    for _ in range(fc_layers):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)

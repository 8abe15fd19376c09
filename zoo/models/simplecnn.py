"""SimpleCNN of report 001 (MNIST, then PathMNIST), both versions of its appendix A.1.

``simplecnn_v1``: conv 32 k3 same, LeakyReLU, max pool 2; conv 64 k3 same, LeakyReLU, max pool 2;
one linear layer. ``simplecnn``: three blocks of conv k3 same (32, 64, 128), BatchNorm, ReLU,
max pool 2, dropout 0.25; fc 256, BatchNorm1d, ReLU, dropout 0.5; fc out. The report's variants
(BN only, dropout only, both) are the ``batchnorm`` / ``dropout`` switches.

The appendix hard-codes the 28 px flattened sizes (64·7·7 and 128·3·3); here they are computed
from ``input_size`` (``input_size // 4`` and ``input_size // 8`` per side), which gives the same
layers at 28 px. The appendix's ``log_softmax`` is left out: the models return raw logits.
"""

from __future__ import annotations

import torch
from torch import nn


def build_simplecnn_v1(
    num_classes: int, in_channels: int, input_size: int, pretrained: bool | str = False
) -> nn.Module:
    """The two-conv SimpleCNN of report 001."""
    side = input_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
        nn.LeakyReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.LeakyReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, num_classes),
    )


def _block(cin: int, cout: int, batchnorm: bool, dropout: bool) -> nn.Sequential:
    """conv k3 same → [BN] → ReLU → max pool 2 → [dropout 0.25]."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel_size=3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(cout))
    layers += [nn.ReLU(), nn.MaxPool2d(2)]
    if dropout:
        layers.append(nn.Dropout(0.25))
    return nn.Sequential(*layers)


class SimpleCNN(nn.Module):
    """Three conv blocks (32/64/128), fc 256 with BatchNorm1d and dropout 0.5, fc out."""

    def __init__(
        self, num_classes: int, in_channels: int, input_size: int, batchnorm: bool, dropout: bool
    ) -> None:
        super().__init__()
        self.conv1 = _block(in_channels, 32, batchnorm, dropout)
        self.conv2 = _block(32, 64, batchnorm, dropout)
        self.conv3 = _block(64, 128, batchnorm, dropout)
        side = input_size // 8
        self.fc1 = nn.Linear(128 * side * side, 256)
        self.fc_bn: nn.Module = nn.BatchNorm1d(256) if batchnorm else nn.Identity()
        self.dropout_fc: nn.Module = nn.Dropout(0.5) if dropout else nn.Identity()
        self.fc2 = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)``."""
        x = self.conv3(self.conv2(self.conv1(x)))
        x = torch.relu(self.fc_bn(self.fc1(x.flatten(1))))
        return self.fc2(self.dropout_fc(x))


def build_simplecnn(
    num_classes: int,
    in_channels: int,
    input_size: int,
    pretrained: bool | str = False,
    *,
    batchnorm: bool = True,
    dropout: bool = True,
) -> nn.Module:
    """The improved SimpleCNN of report 001 (appendix A.1)."""
    return SimpleCNN(num_classes, in_channels, input_size, batchnorm, dropout)

"""Xception (Chollet 2017) in plain PyTorch, the architecture of report 001.

Entry flow: conv 3×3/2 (32) and conv 3×3 (64), unpadded, each BN + ReLU; three residual blocks
of two depthwise-separable convs (128, 256, 728) ending in a 3×3/2 max pool, with 1×1/2 conv
shortcuts. Middle flow: ``middle_blocks`` (8) residual blocks of three ReLU-separable conv-BN at
728 channels. Exit flow: a residual block to 1024 channels with max pool, separable convs to 1536
and 2048 channels, global average pooling and the linear classifier. Report 001 trained it at
168 px (299 px crashed); thanks to the global pooling any input of 7 px or more works. There are
no pretrained weights (torchvision has none).
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.errors import UsageError


class SeparableConv2d(nn.Sequential):
    """Depthwise ``k×k`` conv followed by a pointwise ``1×1`` conv, both without bias."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, padding: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cin, kernel_size, padding=padding, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
        )


class XceptionBlock(nn.Module):
    """``reps`` × (ReLU, separable conv, BN), optional 3×3 max pool, plus a residual shortcut."""

    def __init__(
        self,
        cin: int,
        cout: int,
        reps: int,
        stride: int = 1,
        start_with_relu: bool = True,
        grow_first: bool = True,
    ) -> None:
        super().__init__()
        self.skip: nn.Module
        if cout != cin or stride != 1:
            self.skip = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.skip = nn.Identity()
        widths = [cin] + [cout if grow_first else cin] * (reps - 1) + [cout]
        layers: list[nn.Module] = []
        for i in range(reps):
            if i > 0 or start_with_relu:
                layers.append(nn.ReLU())
            layers += [SeparableConv2d(widths[i], widths[i + 1]), nn.BatchNorm2d(widths[i + 1])]
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride=stride, padding=1))
        self.rep = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual sum of the separable-conv branch and the shortcut."""
        return self.rep(x) + self.skip(x)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    """Unpadded 3×3 conv, BN, ReLU (the two entry convs)."""
    return [nn.Conv2d(cin, cout, 3, stride=stride, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class Xception(nn.Module):
    """Entry flow, ``middle_blocks`` middle blocks, exit flow, global average pool, linear."""

    def __init__(self, num_classes: int, in_channels: int = 3, middle_blocks: int = 8) -> None:
        super().__init__()
        self.entry = nn.Sequential(
            *_conv_bn_relu(in_channels, 32, 2),
            *_conv_bn_relu(32, 64, 1),
            XceptionBlock(64, 128, 2, stride=2, start_with_relu=False),
            XceptionBlock(128, 256, 2, stride=2),
            XceptionBlock(256, 728, 2, stride=2),
        )
        self.middle = nn.Sequential(*(XceptionBlock(728, 728, 3) for _ in range(middle_blocks)))
        self.exit = nn.Sequential(
            XceptionBlock(728, 1024, 2, stride=2, grow_first=False),
            SeparableConv2d(1024, 1536),
            nn.BatchNorm2d(1536),
            nn.ReLU(),
            SeparableConv2d(1536, 2048),
            nn.BatchNorm2d(2048),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2048, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)``."""
        return self.fc(self.exit(self.middle(self.entry(x))))


def build_xception(
    num_classes: int,
    in_channels: int,
    input_size: int,
    pretrained: bool | str = False,
    *,
    middle_blocks: int = 8,
) -> nn.Module:
    """Xception trained from scratch (``middle_blocks`` middle-flow blocks, 8 in the paper)."""
    if middle_blocks < 0:
        raise UsageError(f"xception: middle_blocks must be >= 0, got {middle_blocks}")
    return Xception(num_classes, in_channels, middle_blocks)

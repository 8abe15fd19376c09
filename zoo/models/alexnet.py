"""AlexNet: torchvision's (report 001, ``alexnet`` / ``alexnet_bn``) and report 004's n_base one.

``alexnet`` is ``torchvision.models.alexnet`` with the last classifier layer replaced; a
1-channel model gets a 1-channel first conv (pretrained weights summed over RGB). The smallest
input its feature stack takes is 63 px (conv 11/4, three 3×3/2 max pools). ``alexnet_bn`` is the
report's variant with ``BatchNorm2d`` after every conv (conv → BN → ReLU); pretrained weights
are loaded into the plain network before the BN layers are inserted.

``alexnet_nbase`` is the AlexNet-style Keras network of report 004's lab (layers reconstructed;
the report shows only its hyper-parameters): convs k3 same of width n, 2n, 4n, 4n, 2n with ReLU,
max pool 2 after the 1st, 2nd and 5th; flatten (``2n · (input_size // 8)²`` features, computed
from ``input_size`` so 8..224 px all work, and no adaptive pooling so it exports to ONNX at any
size), dense 64, dense 64, dense out, with optional dropout after the two hidden dense layers
(0.4 in the report).
"""

from __future__ import annotations

from torch import nn
from torchvision.models import AlexNet, AlexNet_Weights

from zoo.errors import UsageError
from zoo.models.weights import (
    Pretrained,
    load_backbone_state,
    resolve_pretrained,
)


def _alexnet(
    num_classes: int, in_channels: int, pretrained: Pretrained, batchnorm: bool, arch: str
) -> AlexNet:
    """torchvision AlexNet, optionally pretrained, with BN layers and a new head."""
    model = AlexNet(num_classes=1000)
    if in_channels != 3:
        model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2)
    state = resolve_pretrained(pretrained, AlexNet_Weights.IMAGENET1K_V1.url, arch)
    if state is not None:
        load_backbone_state(model, state, first_conv="features.0", head_prefixes=("classifier.6.",))
    if batchnorm:
        layers: list[nn.Module] = []
        for layer in model.features:
            layers.append(layer)
            if isinstance(layer, nn.Conv2d):
                layers.append(nn.BatchNorm2d(layer.out_channels))
        model.features = nn.Sequential(*layers)
    model.classifier[6] = nn.Linear(4096, num_classes)
    return model


def build_alexnet(
    num_classes: int,
    in_channels: int,
    input_size: int,
    pretrained: Pretrained = False,
    *,
    batchnorm: bool = False,
) -> nn.Module:
    """torchvision AlexNet; ``batchnorm=True`` adds BatchNorm2d after every conv."""
    return _alexnet(num_classes, in_channels, pretrained, batchnorm, "alexnet")


def build_alexnet_bn(
    num_classes: int, in_channels: int, input_size: int, pretrained: Pretrained = False
) -> nn.Module:
    """``alexnet`` with ``batchnorm=True``."""
    return _alexnet(num_classes, in_channels, pretrained, True, "alexnet_bn")


def build_alexnet_nbase(
    num_classes: int,
    in_channels: int,
    input_size: int,
    pretrained: Pretrained = False,
    *,
    n_base: int = 16,
    dropout: float = 0.0,
) -> nn.Module:
    """Report 004's AlexNet with base width ``n_base`` (8, 16, 32 in the report)."""
    if n_base < 1:
        raise UsageError(f"alexnet_nbase: n_base must be >= 1, got {n_base}")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"alexnet_nbase: dropout must be in [0, 1), got {dropout}")
    n = n_base
    side = input_size // 8

    def conv(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.ReLU()]

    def drop() -> list[nn.Module]:
        return [nn.Dropout(dropout)] if dropout > 0 else []

    return nn.Sequential(
        *conv(in_channels, n),
        nn.MaxPool2d(2),
        *conv(n, 2 * n),
        nn.MaxPool2d(2),
        *conv(2 * n, 4 * n),
        *conv(4 * n, 4 * n),
        *conv(4 * n, 2 * n),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * n * side * side, 64),
        nn.ReLU(),
        *drop(),
        nn.Linear(64, 64),
        nn.ReLU(),
        *drop(),
        nn.Linear(64, num_classes),
    )

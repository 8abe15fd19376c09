"""LeNet-style CNNs: ``lenet`` (report 000, DermaMNIST) and ``lenet_binary`` (report 004).

``lenet``: conv in→6 k5 p2, ReLU, max pool 2; conv 6→16 k5 p2, ReLU, adaptive max pool 7×7
(any input size gives 16·7·7 = 784 features); four fully connected layers 784→256→128→64→classes
with ReLU and dropout 0.5 between them.

``lenet_binary``: the Keras model of report 004 (binary skin lesions, 128 px grey): conv 32 k3
same, ReLU, max pool; conv 64 k3 same, ReLU, max pool; dense 64 ReLU; dense out. The report's
single sigmoid output is ``num_classes=1`` logit here (4,213,249 parameters at 128 px grey, as in
the report's summary table). The flattened size is ``64 · (input_size // 4)²``.
"""

from __future__ import annotations

from torch import nn

from .registry import register_model


@register_model(
    "lenet",
    min_size=2,
    report="000",
    summary="LeNet: 2 convs k5 p2 (6, 16), adaptive max pool 7x7, 4 FC layers, dropout 0.5",
)
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
        nn.AdaptiveMaxPool2d(7),
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


@register_model(
    "lenet_binary",
    min_size=4,
    report="004",
    summary="LeNet-like: conv 32 k3, pool, conv 64 k3, pool, dense 64, dense out (1 logit)",
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

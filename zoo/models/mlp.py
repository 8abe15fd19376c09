"""Multilayer perceptron on the flattened image (reports 000 and 002).

Report 000 (DermaMNIST): hidden [256, 128], each ``Linear → BatchNorm → ReLU → Dropout``.
Report 002 (OrganAMNIST) varies the depth (``hidden=[]`` is its "no hidden" model), the
activation (Leaky-ReLU, tanh) and the normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from zoo.errors import UsageError

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
}


def build_mlp(
    num_classes: int,
    in_channels: int,
    input_size: int,
    pretrained: bool | str = False,
    *,
    hidden: Sequence[int] = (256, 128),
    activation: str = "relu",
    batchnorm: bool = True,
    dropout: float = 0.2,
) -> nn.Module:
    """Flatten ``in_channels * input_size**2`` values, then the hidden layers, then the logits."""
    if activation not in _ACTIVATIONS:
        known = sorted(_ACTIVATIONS)
        raise UsageError(f"mlp: activation must be one of {known}, got {activation!r}")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"mlp: dropout must be in [0, 1), got {dropout}")
    if any(int(h) < 1 for h in hidden):
        raise UsageError(f"mlp: hidden sizes must be >= 1, got {list(hidden)}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * input_size * input_size
    for h in hidden:
        layers.append(nn.Linear(width, int(h)))
        if batchnorm:
            layers.append(nn.BatchNorm1d(int(h)))
        layers.append(_ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)

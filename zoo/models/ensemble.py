"""The seed ensemble as one network (``zoo train … --seeds N``).

``ensemble`` holds its member networks and returns the mean of their logits: the rule of
:func:`zoo.ensemble.combine` (mean of logits, then the one softmax / sigmoid rule of
:mod:`zoo.postprocess`), so an ensemble bundle serves, scores, evaluates and exports like any
other bundle, and gives what ``zoo score --ensemble`` would give for its members. The members are
described by the card's ``model_kwargs`` (``members: [{arch, model_kwargs}, …]``), so
:func:`zoo.bundle.build_net` rebuilds it from the card like any architecture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from zoo.errors import UsageError


class MeanOfLogits(nn.Module):
    """Members run on the same input; the output is the mean of their logits."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise UsageError(f"an ensemble needs at least two members, not {len(members)}")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def build_ensemble(
    num_classes: int,
    in_channels: int,
    input_size: int,
    pretrained: bool | str = False,
    *,
    members: Sequence[Mapping[str, Any]],
) -> nn.Module:
    """``members``: one ``{"arch": name, "model_kwargs": {...}}`` per member (untrained networks)."""
    from zoo.models.registry import create_model

    if pretrained:
        raise UsageError("ensemble: members come from trained bundles, not pretrained weights")
    nets = []
    for i, m in enumerate(members):
        if not isinstance(m, Mapping) or "arch" not in m:
            raise UsageError(f"ensemble: member {i} must be a mapping with an 'arch', got {m!r}")
        if m["arch"] == "ensemble":
            raise UsageError("ensemble: a member cannot itself be an ensemble")
        nets.append(create_model(m["arch"], num_classes=num_classes, in_channels=in_channels,
                                 input_size=input_size, pretrained=False, **dict(m.get("model_kwargs") or {})))
    return MeanOfLogits(nets)

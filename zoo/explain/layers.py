"""The Grad-CAM layer of a network, found from the registry's ``cam_layer`` path.

The path syntax is documented in :mod:`zoo.models.catalog`: steps separated by dots, each a
child's name, an index into a ``Sequential`` / ``ModuleList`` (negative counts from the end) or
``Type[i]``, the ``i``-th direct child of class ``Type``. Nothing is guessed: a path that does not
lead to a module is an :class:`~zoo.errors.ExplainError` naming the step and what was there.
"""

from __future__ import annotations

import re

from torch import nn

from zoo.errors import ExplainError

_TYPED = re.compile(r"^([A-Za-z_]\w*)\[(-?\d+)\]$")
_INDEX = re.compile(r"^-?\d+$")


def _children_text(module: nn.Module) -> str:
    kids = [f"{name} ({type(child).__name__})" for name, child in module.named_children()]
    return ", ".join(kids) or "none"


def _step(module: nn.Module, step: str, path: str) -> nn.Module:
    """One step of ``path`` from ``module``."""
    typed = _TYPED.match(step)
    if typed:
        kind, i = typed.group(1), int(typed.group(2))
        matches = [c for c in module.children() if type(c).__name__ == kind]
        if -len(matches) <= i < len(matches):
            return matches[i]
        raise ExplainError(f"cam_layer {path!r}: {type(module).__name__} has {len(matches)} {kind} "
                           f"child(ren), no {step}; its children: {_children_text(module)}")
    if _INDEX.match(step) and isinstance(module, (nn.Sequential, nn.ModuleList)):
        kids = list(module.children())
        i = int(step)
        if -len(kids) <= i < len(kids):
            return kids[i]
        raise ExplainError(f"cam_layer {path!r}: index {i} is outside {type(module).__name__} of {len(kids)}")
    child = dict(module.named_children()).get(step)
    if child is None:
        raise ExplainError(f"cam_layer {path!r}: {type(module).__name__} has no child {step!r}; "
                           f"its children: {_children_text(module)}")
    return child


def resolve_layer(net: nn.Module, path: str) -> nn.Module:
    """The module of ``net`` that ``path`` names."""
    if not path or any(not s for s in path.split(".")):
        raise ExplainError(f"cam_layer {path!r} is not a dotted module path")
    module = net
    for step in path.split("."):
        module = _step(module, step, path)
    return module


__all__ = ["resolve_layer"]

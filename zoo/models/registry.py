"""The model registry: one name per architecture, one way to build it (no torch at import).

What each architecture is — the family module and builder that make it, the input sizes it
takes, the report it comes from, whether ImageNet weights exist, the layer Grad-CAM reads — is
data in :mod:`zoo.models.catalog`, so listing, validating recipes and ``zoo models`` never import
torch. :func:`create_model` imports the family module only when a network is built; it validates
the request (channels, input size, keyword arguments, pretrained weights) first.

Builders have the signature ``builder(num_classes, in_channels, input_size, pretrained, **kwargs)``
and return a module that maps ``(N, in_channels, input_size, input_size)`` floats to raw logits
``(N, num_classes)``. :func:`register_model` adds an architecture from outside the package.
"""

from __future__ import annotations

import fnmatch
import inspect
import os
from collections.abc import Callable
from typing import Any

from zoo.errors import UsageError, unknown
from zoo.models.catalog import ARCHITECTURES
from zoo.models.spec import STANDARD_SIZES, ModelSpec

_FIXED_ARGS = ("num_classes", "in_channels", "input_size", "pretrained")

_REGISTRY: dict[str, ModelSpec] = {}


def _add(spec: ModelSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    if spec.max_size is not None and spec.max_size < spec.min_size:
        raise ValueError(f"model {spec.name!r}: max_size {spec.max_size} < min_size {spec.min_size}")
    _REGISTRY[spec.name] = spec


def register_model(name: str, **meta: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering an architecture defined outside medzoo's catalogue."""

    def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
        entry = f"{builder.__module__}:{builder.__qualname__}"
        _add(ModelSpec(name=name, entry=entry, _builder=builder, **meta))
        return builder

    return decorator


def _load_catalog() -> None:
    for spec in ARCHITECTURES:
        _add(spec)


def list_models(filter: str = "", pretrained: bool = False) -> list[str]:  # noqa: A002 - timm's name
    """Names of the registered architectures, sorted; as ``timm.list_models``: ``filter`` is a
    shell-style pattern (``"resnet*"``), ``pretrained=True`` keeps those with ImageNet weights."""
    names = sorted(_REGISTRY)
    if filter:
        names = fnmatch.filter(names, filter)
    if pretrained:
        names = [n for n in names if _REGISTRY[n].supports_pretrained]
    return names


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; an ``UnknownNameError`` ("did you mean …") otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise unknown("architecture", name, list_models(), hint=f"known: {', '.join(list_models())}") from None


def _check_args(spec: ModelSpec, num_classes: Any, in_channels: Any, input_size: Any, pretrained: Any) -> None:
    name = spec.name
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UsageError(f"{name}: num_classes must be an integer >= 1, got {num_classes!r}")
    if in_channels not in (1, 3) or isinstance(in_channels, bool):
        raise UsageError(f"{name}: in_channels must be 1 or 3, got {in_channels!r}")
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise UsageError(f"{name}: input_size must be an integer, got {input_size!r}")
    if not spec.accepts(input_size):
        supported = ", ".join(str(s) for s in spec.sizes()) or "none"
        raise UsageError(
            f"model {name!r} does not support input_size={input_size}: it accepts square inputs "
            f"of {spec.size_rule()} (standard sizes supported: {supported})"
        )
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise UsageError(f"{name}: pretrained must be a bool or a file path, got {pretrained!r}")
    if pretrained and not spec.supports_pretrained:
        raise UsageError(f"model {name!r} has no pretrained weights; use pretrained=False")


def model_kwargs(spec: ModelSpec) -> list[str]:
    """Names of the architecture-specific keyword arguments of a builder."""
    return [p for p in inspect.signature(spec.builder).parameters if p not in _FIXED_ARGS]


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    input_size: int = 28,
    pretrained: bool | str | os.PathLike[str] = False,
    **kwargs: Any,
) -> Any:
    """Build architecture ``name`` (an ``nn.Module``) returning ``(N, num_classes)`` logits.

    ``num_classes=1`` gives a single-logit binary head (BCE / hinge losses). ``pretrained`` is
    ``False``, ``True`` (torchvision ImageNet weights from torch hub's cache or the network) or the
    path of a local ``.safetensors`` / ``.pth`` state dict. Raises ``ValueError`` for anything the
    architecture does not support, :class:`~zoo.errors.WeightsUnavailableError` when weights
    cannot be had.
    """
    spec = get_spec(name)
    _check_args(spec, num_classes, in_channels, input_size, pretrained)
    builder = spec.builder
    try:
        inspect.signature(builder).bind(num_classes, in_channels, input_size, pretrained, **kwargs)
    except TypeError:
        accepted = model_kwargs(spec)
        unknown_kw = sorted(set(kwargs) - set(accepted))
        raise UsageError(
            f"model {name!r} got unknown keyword argument(s) {', '.join(unknown_kw)}; "
            f"it accepts: {', '.join(accepted) or 'none'}"
        ) from None
    return builder(num_classes, in_channels, input_size, pretrained, **kwargs)


_load_catalog()

__all__ = ["STANDARD_SIZES", "ModelSpec", "create_model", "get_spec", "list_models", "model_kwargs",
           "register_model"]

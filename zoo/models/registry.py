"""The model registry: one name per architecture, one way to build it.

Every family module decorates its builder with :func:`register_model`; :func:`create_model`
validates the request (channels, input size, keyword arguments, pretrained weights) against the
architecture's :class:`ModelSpec` before calling the builder. Builders have the signature
``builder(num_classes, in_channels, input_size, pretrained, **kwargs)`` and return a module that
maps ``(N, in_channels, input_size, input_size)`` floats to raw logits ``(N, num_classes)``.

The second half of this module resolves pretrained weights for the torchvision families:
ImageNet weights through torch hub's cache (never downloaded silently when offline: that is a
:class:`WeightsUnavailableError`), or a local ``.safetensors`` / ``.pth`` state dict, loaded
without unpickling.
"""

from __future__ import annotations

import http.client
import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

STANDARD_SIZES: tuple[int, ...] = (28, 64, 128, 224)

Pretrained = bool | str | os.PathLike[str]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found locally nor downloaded (message is one line)."""


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one architecture."""

    name: str
    builder: Callable[..., nn.Module]
    min_size: int
    max_size: int | None
    fixed_size: int | None
    report: str
    summary: str
    supports_pretrained: bool

    def sizes(self) -> list[int]:
        """The standard input sizes this architecture supports (only ``fixed_size`` if set)."""
        if self.fixed_size is not None:
            return [self.fixed_size]
        return [s for s in STANDARD_SIZES if self.accepts(s)]

    def accepts(self, input_size: int) -> bool:
        """Whether a square input of ``input_size`` pixels is accepted."""
        if self.fixed_size is not None:
            return input_size == self.fixed_size
        if input_size < self.min_size:
            return False
        return self.max_size is None or input_size <= self.max_size

    def size_rule(self) -> str:
        """Human-readable statement of the accepted sizes."""
        if self.fixed_size is not None:
            return f"exactly {self.fixed_size} px"
        if self.max_size is None:
            return f"{self.min_size} px or more"
        return f"{self.min_size} to {self.max_size} px"


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    min_size: int = 28,
    max_size: int | None = None,
    fixed_size: int | None = None,
    report: str = "",
    summary: str = "",
    supports_pretrained: bool = False,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``builder`` under ``name`` (names are unique)."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        if max_size is not None and max_size < min_size:
            raise ValueError(f"model {name!r}: max_size {max_size} < min_size {min_size}")
        _REGISTRY[name] = ModelSpec(
            name=name,
            builder=builder,
            min_size=min_size,
            max_size=max_size,
            fixed_size=fixed_size,
            report=report,
            summary=summary,
            supports_pretrained=supports_pretrained,
        )
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of all registered architectures, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}"
        ) from None


def _model_kwargs(builder: Callable[..., nn.Module]) -> list[str]:
    """Names of the architecture-specific keyword arguments of a builder."""
    fixed = {"num_classes", "in_channels", "input_size", "pretrained"}
    return [p for p in inspect.signature(builder).parameters if p not in fixed]


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    input_size: int = 28,
    pretrained: Pretrained = False,
    **kwargs: object,
) -> nn.Module:
    """Build architecture ``name`` returning ``(N, num_classes)`` logits.

    ``num_classes=1`` gives a single-logit binary head (BCE / hinge losses). ``pretrained`` is
    ``False``, ``True`` (torchvision ImageNet weights from torch hub's cache or the network) or the
    path of a local ``.safetensors`` / ``.pth`` state dict. Raises ``ValueError`` for anything the
    architecture does not support, :class:`WeightsUnavailableError` when weights cannot be had.
    """
    spec = get_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{name}: num_classes must be an integer >= 1, got {num_classes!r}")
    if in_channels not in (1, 3) or isinstance(in_channels, bool):
        raise ValueError(f"{name}: in_channels must be 1 or 3, got {in_channels!r}")
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise ValueError(f"{name}: input_size must be an integer, got {input_size!r}")
    if not spec.accepts(input_size):
        supported = ", ".join(str(s) for s in spec.sizes()) or "none"
        raise ValueError(
            f"model {name!r} does not support input_size={input_size}: it accepts square inputs "
            f"of {spec.size_rule()} (standard sizes supported: {supported})"
        )
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise ValueError(f"{name}: pretrained must be a bool or a file path, got {pretrained!r}")
    if pretrained and not spec.supports_pretrained:
        raise ValueError(f"model {name!r} has no pretrained weights; use pretrained=False")
    try:
        inspect.signature(spec.builder).bind(
            num_classes, in_channels, input_size, pretrained, **kwargs
        )
    except TypeError:
        accepted = _model_kwargs(spec.builder)
        unknown = sorted(set(kwargs) - set(accepted))
        raise ValueError(
            f"model {name!r} got unknown keyword argument(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or 'none'}"
        ) from None
    return spec.builder(num_classes, in_channels, input_size, pretrained, **kwargs)


# --- pretrained weights -------------------------------------------------------------------------


def _hub_cache_file(url: str) -> Path:
    """Where torch hub keeps the file downloaded from ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _download_state(url: str, arch: str) -> dict[str, torch.Tensor]:
    """ImageNet state dict from torch hub's cache, downloading it if the network allows."""
    cached = _hub_cache_file(url)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except (OSError, http.client.HTTPException) as exc:
        raise WeightsUnavailableError(
            f"ImageNet weights for {arch} are unavailable ({type(exc).__name__}): expected "
            f"{cached.name} in {cached.parent}, downloaded from {url}; put the file there or give "
            f'a local file instead: pretrained="/path/to/weights.safetensors|.pth"'
        ) from exc


def load_state_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from a local ``.safetensors`` or ``.pth``/``.pt`` file (never unpickled)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsUnavailableError(f"weights file not found: {file}")
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state: object = load_file(str(file), device="cpu")
    elif suffix in (".pth", ".pt"):
        state = torch.load(file, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"weights file {file} must end in .safetensors, .pth or .pt")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {file} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def resolve_pretrained(
    pretrained: Pretrained, url: str, arch: str
) -> dict[str, torch.Tensor] | None:
    """The state dict asked for by ``pretrained`` (``None`` when it is falsy)."""
    if not pretrained:
        return None
    if pretrained is True:
        return _download_state(url, arch)
    return load_state_file(pretrained)  # type: ignore[arg-type]


def load_backbone_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    first_conv: str,
    head_prefixes: Iterable[str],
) -> None:
    """Load ``state`` into a torchvision backbone whose first conv may take 1 channel.

    A 3-channel ``first_conv`` weight is summed over its channel axis when the model's first conv
    takes one channel. Keys under ``head_prefixes`` whose shape differs (another class count) are
    skipped; every other parameter and buffer must be present with the right shape.
    """
    state = dict(state)
    own = model.state_dict()
    key = f"{first_conv}.weight"
    if key in state and key in own and state[key].shape[1] == 3 and own[key].shape[1] == 1:
        state[key] = state[key].sum(dim=1, keepdim=True)
    heads = tuple(head_prefixes)
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    bad = [k for k in own if k not in usable and not k.startswith(heads)]
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ValueError(
            f"pretrained weights do not fit the backbone: {len(bad)} missing or mis-shaped "
            f"entries ({shown})"
        )
    model.load_state_dict(usable, strict=False)

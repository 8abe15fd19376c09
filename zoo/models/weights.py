"""Pretrained weights for the torchvision families: ImageNet weights through torch hub's cache
(never downloaded silently when offline: that is a :class:`~zoo.errors.WeightsUnavailableError`),
or a local ``.safetensors`` / ``.pth`` state dict, loaded without unpickling."""

from __future__ import annotations

import http.client
import os
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from zoo.errors import UsageError, WeightsUnavailableError

Pretrained = bool | str | os.PathLike[str]

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
        raise UsageError(f"weights file {file} must end in .safetensors, .pth or .pt")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"weights file {file} does not hold a state dict of tensors")
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
        raise UsageError(
            f"pretrained weights do not fit the backbone: {len(bad)} missing or mis-shaped "
            f"entries ({shown})"
        )
    model.load_state_dict(usable, strict=False)

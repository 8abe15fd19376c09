"""Batched augmentation on float [0, 1] NCHW tensors, on whatever device the batch is on.

torchvision's v2 transforms draw one set of parameters per call, i.e. per batch; the reports
(001: hflip, vflip, rotation 30°, colour jitter, each with p 0.1) apply them per image. Doing
that image by image in the hot loop is what made the naive loop slow, so each op here draws its
parameters per image and applies them to the whole batch at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.recipe import AugmentCfg


def _pick(n: int, p: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=g) < p).to(device)


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def augment(x: torch.Tensor, cfg: AugmentCfg, g: torch.Generator) -> torch.Tensor:
    """Apply the recipe's augmentations; ``g`` (a CPU generator) makes it reproducible."""
    if not cfg.enabled:
        return x
    n, dev = x.shape[0], x.device
    if cfg.hflip_p > 0:
        m = _pick(n, cfg.hflip_p, g, dev).view(n, 1, 1, 1)
        x = torch.where(m, x.flip(-1), x)
    if cfg.vflip_p > 0:
        m = _pick(n, cfg.vflip_p, g, dev).view(n, 1, 1, 1)
        x = torch.where(m, x.flip(-2), x)
    if cfg.rotation_p > 0 and cfg.rotation_deg > 0:
        idx = torch.nonzero(_pick(n, cfg.rotation_p, g, dev)).flatten()
        angle = (torch.rand(n, generator=g) * 2 - 1).to(dev) * math.radians(cfg.rotation_deg)
        if len(idx):  # only the chosen images are resampled
            a = angle[idx]
            cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
            theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
            sub = x[idx]
            grid = F.affine_grid(theta.to(x.dtype), list(sub.shape), align_corners=False)
            rotated = F.grid_sample(sub, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            x = x.index_copy(0, idx, rotated)
    if cfg.jitter_p > 0:
        idx = torch.nonzero(_pick(n, cfg.jitter_p, g, dev)).flatten()
        factors = [(1 + (torch.rand(n, generator=g) * 2 - 1) * s).to(dev, x.dtype).view(n, 1, 1, 1)
                   for s in (cfg.brightness, cfg.contrast, cfg.saturation)]
        if len(idx):
            b, c, s = (f[idx] for f in factors)
            y = x[idx] * b
            mean = _grey(y).mean(dim=(1, 2, 3), keepdim=True)
            y = (y - mean) * c + mean
            if x.shape[1] == 3:
                grey = _grey(y)
                y = (y - grey) * s + grey
            x = x.index_copy(0, idx, y.clamp(0, 1))
    return x

"""Batched augmentation on float [0, 1] NCHW tensors, on whatever device the batch is on.

torchvision's v2 transforms draw one set of parameters per call, i.e. per batch; the reports
(001: hflip, vflip, rotation 30°, colour jitter, each with p 0.1) apply them per image; the medzoo
recipes add quarter turns and a small affine (translation, zoom) with a fill mode per modality. Doing
that image by image in the hot loop is what made the naive loop slow, so each op here draws its
parameters per image and applies them to the whole batch at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.recipe import AugmentCfg


def _chosen(n: int, p: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Indices of the images an op with probability ``p`` applies to (drawn on the CPU generator)."""
    return torch.nonzero(torch.rand(n, generator=g) < p).flatten().to(device)


def _uniform(n: int, half_width: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` draws from U(-half_width, half_width), one per image whether chosen or not, so that the
    generator's stream does not depend on which images were chosen."""
    return ((torch.rand(n, generator=g) * 2 - 1) * half_width).to(device)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma with torchvision's weights (``rgb_to_grayscale``), so jitter matches ColorJitter."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.2989, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(a: torch.Tensor, b: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    """``factor * a + (1 - factor) * b``, clamped to [0, 1]: torchvision's ``_blend``."""
    return (factor * a + (1 - factor) * b).clamp_(0, 1)


def _warp(x: torch.Tensor, theta: torch.Tensor, fill: str) -> torch.Tensor:
    """Resample each image through its 2×3 affine matrix (output → input, normalised coordinates)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=fill, align_corners=False)


def _rotate(x: torch.Tensor, angle: torch.Tensor, fill: str = "zeros") -> torch.Tensor:
    """Rotate each image by its angle (radians) about the centre, bilinear."""
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _warp(x, theta, fill)


def _affine(x: torch.Tensor, shift: torch.Tensor, zoom: torch.Tensor, fill: str) -> torch.Tensor:
    """Zoom each image by its factor about the centre and shift it by its (dx, dy), fractions of the side."""
    inv, zero = 1.0 / zoom, torch.zeros_like(zoom)
    # output pixel p shows input pixel (p - 2 * shift) / zoom (the normalised side is 2)
    theta = torch.stack([torch.stack([inv, zero, -2 * shift[:, 0] * inv], 1),
                         torch.stack([zero, inv, -2 * shift[:, 1] * inv], 1)], 1)
    return _warp(x, theta, fill)


def _rot90(x: torch.Tensor, idx: torch.Tensor, quarter: torch.Tensor) -> None:
    """Turn image ``idx[i]`` by ``quarter[i]`` quarter turns, in place (square images)."""
    for k in (1, 2, 3):
        sel = idx[quarter == k]
        if len(sel):
            x[sel] = torch.rot90(x[sel], k, dims=(-2, -1))


def _jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
            saturation: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, then saturation, each as torchvision's ColorJitter does it."""
    b, c, s = (f.to(x.dtype).view(-1, 1, 1, 1) for f in (brightness, contrast, saturation))
    x = _blend(x, 0.0, b)
    x = _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True), c)
    if x.shape[1] == 3:
        x = _blend(x, _grey(x), s)
    return x


def _geometry(x: torch.Tensor, cfg: AugmentCfg, g: torch.Generator) -> None:
    """Flips, quarter turns, rotation, affine: in place on the images each op draws."""
    n, dev = x.shape[0], x.device
    if cfg.hflip_p > 0:
        idx = _chosen(n, cfg.hflip_p, g, dev)
        if len(idx):
            x[idx] = x[idx].flip(-1)
    if cfg.vflip_p > 0:
        idx = _chosen(n, cfg.vflip_p, g, dev)
        if len(idx):
            x[idx] = x[idx].flip(-2)
    if cfg.rot90_p > 0:
        idx = _chosen(n, cfg.rot90_p, g, dev)
        quarter = torch.randint(1, 4, (n,), generator=g).to(dev)
        if len(idx):
            _rot90(x, idx, quarter[idx])
    if cfg.rotation_p > 0 and cfg.rotation_deg > 0:
        idx = _chosen(n, cfg.rotation_p, g, dev)
        angle = _uniform(n, math.radians(cfg.rotation_deg), g, dev)
        if len(idx):
            x[idx] = _rotate(x[idx], angle[idx], cfg.fill)
    if cfg.affine_p > 0 and (cfg.translate > 0 or cfg.scale > 0):
        idx = _chosen(n, cfg.affine_p, g, dev)
        shift = torch.stack([_uniform(n, cfg.translate, g, dev), _uniform(n, cfg.translate, g, dev)], 1)
        zoom = 1 + _uniform(n, cfg.scale, g, dev)
        if len(idx):
            x[idx] = _affine(x[idx], shift[idx], zoom[idx], cfg.fill)


def _medmnistc(x: torch.Tensor, dataset: str | None, g: torch.Generator) -> torch.Tensor:
    """MedMNIST-C's augmentation of every image (``AugMedMNISTC`` over ``dataset``'s corruptions), on
    the CPU in numpy / PIL / ImageMagick as medmnistc works; its draws are seeded from ``g``, so a
    run and its resume draw the same corruptions."""
    from zoo.trust.robustness import augment_images, corruption_set

    corruptions, _ = corruption_set(dataset or "")
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    images = x.mul(255).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()
    return torch.from_numpy(augment_images(images, corruptions, seed)).to(x.device, x.dtype).div_(255)


def augment(x: torch.Tensor, cfg: AugmentCfg, g: torch.Generator, dataset: str | None = None) -> torch.Tensor:
    """Apply the recipe's augmentations, each to the images it draws (probability per image).

    Returns a new tensor (``x`` is left as it was); ``g`` (a CPU generator) makes it reproducible.
    Only the chosen images are touched, so the cost follows p · batch, not the batch. ``dataset``
    (canonical name) chooses MedMNIST-C's corruptions when ``cfg.medmnistc``.
    """
    if not cfg.enabled:
        return x
    n, dev = x.shape[0], x.device
    x = _medmnistc(x, dataset, g) if cfg.medmnistc else x.clone()
    _geometry(x, cfg, g)
    if cfg.jitter_p > 0:
        idx = _chosen(n, cfg.jitter_p, g, dev)
        factors = [1 + _uniform(n, s, g, dev) for s in (cfg.brightness, cfg.contrast, cfg.saturation)]
        if len(idx):
            x[idx] = _jitter(x[idx], *(f[idx] for f in factors))
    return x

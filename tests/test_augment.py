"""The engine's batched augmentation: per-image draws, torchvision's maths, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from zoo.recipe import AugmentCfg
from zoo.train.augment import _jitter, _rotate, augment


def _batch(n: int = 64, c: int = 3) -> torch.Tensor:
    return torch.rand(n, c, 28, 28, generator=torch.Generator().manual_seed(1))


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a != b).flatten(1).any(1)


def test_disabled_is_identity() -> None:
    x = _batch()
    assert torch.equal(augment(x, AugmentCfg(), torch.Generator()), x)


@pytest.mark.parametrize("c", [1, 3])
def test_certain_flips_flip_every_image_and_leave_the_input(c: int) -> None:
    x = _batch(c=c)
    before = x.clone()
    out = augment(x, AugmentCfg(hflip_p=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(out, x.flip(-1)) and torch.equal(x, before)
    out = augment(x, AugmentCfg(vflip_p=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(out, x.flip(-2))


def test_probability_is_per_image_and_unchosen_images_are_untouched() -> None:
    x = _batch(2000, 1)
    out = augment(x, AugmentCfg(hflip_p=0.3), torch.Generator().manual_seed(0))
    changed = _changed(out, x)
    assert 0.25 < changed.float().mean().item() < 0.35
    assert torch.equal(out[changed], x[changed].flip(-1))
    assert torch.equal(out[~changed], x[~changed])


def test_report_001_augmentation_is_reproducible_and_stays_in_range() -> None:
    cfg = AugmentCfg(hflip_p=0.1, vflip_p=0.1, rotation_deg=30, rotation_p=0.1, jitter_p=0.1)
    x = _batch(512)
    a = augment(x, cfg, torch.Generator().manual_seed(7))
    b = augment(x, cfg, torch.Generator().manual_seed(7))
    c = augment(x, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    # four independent ops at p 0.1: 1 - 0.9^4 ≈ 34 % of the images change
    assert 0.25 < _changed(a, x).float().mean().item() < 0.45


@pytest.mark.parametrize("degrees", [30.0, -12.5])
def test_rotation_is_torchvisions(degrees: float) -> None:
    x = _batch(4)
    ours = _rotate(x, torch.full((4,), math.radians(degrees)))
    theirs = TF.rotate(x, degrees, interpolation=TF.InterpolationMode.BILINEAR)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_rotation_angles_stay_within_the_recipe() -> None:
    """A disc of ones rotated by ≤ 10° leaves the centre alone; by up to 90° it moves corners."""
    x = torch.ones(256, 1, 28, 28)
    small = augment(x, AugmentCfg(rotation_deg=10, rotation_p=1.0), torch.Generator().manual_seed(0))
    large = augment(x, AugmentCfg(rotation_deg=90, rotation_p=1.0), torch.Generator().manual_seed(0))
    assert torch.allclose(small[:, :, 8:20, 8:20], x[:, :, 8:20, 8:20])
    corner_loss = (1 - large[:, 0, 0, 0])
    assert (corner_loss > 0.5).float().mean() > 0.7  # most angles are far from 0


def test_jitter_is_torchvisions_colorjitter() -> None:
    x = _batch(4)
    b, c, s = torch.tensor([1.2, 0.8, 1.0, 1.1]), torch.tensor([0.8, 1.2, 1.1, 1.0]), torch.tensor([1.2, 0.8, 0.9, 1.0])
    ours = _jitter(x, b, c, s)
    theirs = torch.stack([
        TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[i], float(b[i])), float(c[i])), float(s[i]))
        for i in range(4)
    ])
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_augment_runs_on_channels_last_and_keeps_shape() -> None:
    cfg = AugmentCfg(hflip_p=0.5, vflip_p=0.5, rotation_deg=45, rotation_p=0.5, jitter_p=0.5)
    x = _batch(32).contiguous(memory_format=torch.channels_last)
    out = augment(x, cfg, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype

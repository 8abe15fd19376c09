"""Images that are not the training data, as uint8 arrays in a dataset's layout: real photographs
that packages ship (scikit-image's and scikit-learn's sample images, LFW faces, sklearn's digits)
and simple shifts of in-distribution images (noise, blank, inverted, rotated). For the
out-of-distribution benchmark (``bench/bench_trust.py``) and its tests; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

# scikit-image sample images shipped inside the package (no download): photographs and textures
_SKIMAGE = ("astronaut", "camera", "cat", "chelsea", "coffee", "rocket", "moon", "clock", "coins", "brick",
            "grass", "gravel", "hubble_deep_field", "page", "text")


def _to_array(img: Image.Image, size: int, channels: int) -> np.ndarray:
    img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _crops(photo: np.ndarray, n: int, rng: np.random.Generator) -> list[Image.Image]:
    """The whole photograph and ``n`` random square crops of it (from a quarter of its side up)."""
    img = Image.fromarray(photo)
    w, h = img.size
    out = [img]
    for _ in range(n):
        side = int(rng.integers(min(w, h) // 4, min(w, h)))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        out.append(img.crop((x, y, x + side, y + side)))
    return out


def natural_photographs(size: int, channels: int, crops: int = 15, seed: int = 0) -> np.ndarray:
    """scikit-image's and scikit-learn's sample photographs, whole and in random crops: (N, C, S, S)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, name)() for name in _SKIMAGE] + list(load_sample_images().images)
    return np.stack([_to_array(c, size, channels) for p in photos for c in _crops(np.asarray(p), crops, rng)])


def faces(size: int, channels: int, n: int = 100) -> np.ndarray:
    """Faces of scikit-image's LFW subset (25 × 25 px grey photographs)."""
    import skimage.data

    lfw = skimage.data.lfw_subset()[:n]
    return np.stack([_to_array(Image.fromarray((f * 255).astype(np.uint8)), size, channels) for f in lfw])


def digits(size: int, channels: int) -> np.ndarray:
    """scikit-learn's handwritten digits (8 × 8 px, 16 grey levels)."""
    from sklearn.datasets import load_digits

    imgs = (load_digits().images * (255 / 16)).astype(np.uint8)
    return np.stack([_to_array(Image.fromarray(d), size, channels) for d in imgs])


SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "uniform noise": lambda x, rng: rng.integers(0, 256, x.shape, dtype=np.uint8),
    "blank (black)": lambda x, rng: np.zeros_like(x),
    "blank (white)": lambda x, rng: np.full_like(x, 255),
    "inverted": lambda x, rng: 255 - x,
    "rotated 90°": lambda x, rng: np.ascontiguousarray(np.rot90(x, 1, axes=(2, 3))),
    "heavy noise added": lambda x, rng: np.clip(x + rng.normal(0, 80, x.shape), 0, 255).astype(np.uint8),
}


def shifted(images: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """In-distribution images (N, C, H, W) under one of :data:`SHIFTS`."""
    return SHIFTS[kind](images, np.random.default_rng(seed))


__all__ = ["SHIFTS", "digits", "faces", "natural_photographs", "shifted"]

"""The one definition of image preprocessing.

Two halves, used by training evaluation, export, serving and scoring alike:

* :func:`load_image` turns an image file (path or bytes) into a ``uint8`` array
  ``(C, image_size, image_size)``: the same layout as the MedMNIST arrays the models were
  trained on.
* :class:`InputAdapter` turns a batch of such arrays into the network's input: float in
  [0, 1], bilinear resize to ``input_size`` when it differs, per-channel normalisation. It is
  an ``nn.Module`` so that exported models (ONNX, TorchScript) carry it inside them and take
  raw ``uint8`` images.

Mode rules of :func:`load_image` (documented in the README, tested one by one):

* palette (``P``), ``LA``, ``RGBA``, ``PA``: alpha is composited over **black** (MedMNIST
  backgrounds are dark), then converted as below;
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: converted to RGB by Pillow;
* 16-bit and 32-bit grey (``I;16*``, ``I``, ``F``): scaled linearly from the image's own
  min..max to 0..255 (medical exports are often 12/16-bit and rarely use the full range);
  in float images non-finite pixels are left out of min..max and become 0 (NaN, -inf) or 255
  (+inf); an image with no finite pixel is refused;
* ``1`` (bilevel): 0/255;
* RGB image for a grey model: ITU-R 601-2 luma (Pillow's ``L``); grey image for an RGB model:
  the grey channel repeated three times;
* then a bilinear resize of the whole image to ``image_size`` × ``image_size`` (no crop).

Refused with :class:`ImageError`: empty, truncated, corrupt or non-image data, images above
``MAX_PIXELS`` (decompression bombs) and multi-frame files beyond the first frame are ignored.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

# A 224 px model never needs more than this; a larger upload is refused before it is decoded.
MAX_PIXELS = 64_000_000

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """An image that cannot be used; the message says why, for the user.

    ``kind`` classifies the refusal for callers that map it (the service's HTTP status):
    ``"empty"``, ``"unsupported"`` (not an image, or a mode that cannot be converted),
    ``"too_large"`` (decompression bombs, over ``MAX_PIXELS``) or ``"corrupt"`` (truncated or
    damaged data, or a decodable image with nothing usable in it).
    """

    def __init__(self, message: str, kind: str = "corrupt") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn a file or an array into a model input (stored in the card)."""

    image_size: int  # resolution of the arrays the model takes (the dataset's)
    input_size: int  # resolution the network sees after the adapter's resize
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, not {self.in_channels}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("mean and std need one value per channel")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            image_size=int(d["image_size"]),
            input_size=int(d["input_size"]),
            in_channels=int(d["in_channels"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )


def normalisation_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) of a uint8 NCHW tensor, e.g. a train split."""
    x = images.to(torch.float64).div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


class InputAdapter(nn.Module):
    """uint8 (or [0, 1] float) NCHW at ``image_size`` → normalised float at ``input_size``."""

    def __init__(self, prep: Preprocessing) -> None:
        super().__init__()
        self.input_size = prep.input_size
        shape = (1, prep.in_channels, 1, 1)
        self.register_buffer("mean", torch.tensor(prep.mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(prep.std, dtype=torch.float32).view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        else:
            x = x.float()
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            # No antialias: the usual case is upsampling (28 px data, 224 px network), and plain
            # bilinear exports to every ONNX runtime.
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        return (x - self.mean) / self.std


def _to_8bit(img: Image.Image) -> Image.Image:
    """Wide grey modes (I;16, I, F) → L by min..max scaling of the finite pixels."""
    arr = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        raise ImageError("float image without a single finite pixel value")  # decodable, but nothing usable in it: 422
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
    # NaN → 0, +inf → 255, -inf → 0 (one NaN used to turn the whole image black)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _flatten_alpha(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def convert_mode(img: Image.Image, in_channels: int) -> Image.Image:
    """Apply the documented mode rules; returns an ``L`` or ``RGB`` image."""
    mode = img.mode
    if mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        img = _flatten_alpha(img)
    elif mode.startswith("I") or mode == "F":
        img = _to_8bit(img)
    elif mode == "1":
        img = img.convert("L")
    elif mode not in ("L", "RGB"):
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise ImageError(f"unsupported image mode {mode!r}: {e}", "unsupported") from e
    target = "L" if in_channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def load_image(
    src: str | os.PathLike[str] | bytes | BinaryIO, prep: Preprocessing
) -> np.ndarray:
    """Decode an image file into ``uint8 (C, image_size, image_size)`` following the mode rules."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError("empty file", "empty")
        fp: Any = io.BytesIO(bytes(src))
    elif isinstance(src, (str, os.PathLike)):
        if Path(src).stat().st_size == 0:
            raise ImageError("empty file", "empty")
        fp = src
    else:
        fp = src
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageError(
                        f"image of {w}x{h} pixels is larger than the {MAX_PIXELS} pixel limit", "too_large"
                    )
                if w == 0 or h == 0:
                    raise ImageError("image has no pixels", "empty")
                img.load()  # decode now so truncation shows here, not later
                img = convert_mode(img, prep.in_channels)
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError("not an image file Pillow can read", "unsupported") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image refused as a decompression bomb: {e}", "too_large") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from e
    if img.size != (prep.image_size, prep.image_size):
        img = img.resize((prep.image_size, prep.image_size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def stack_images(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Stack decoded images into a batch (N, C, H, W) uint8."""
    return np.stack(arrays, axis=0) if arrays else np.zeros((0, 1, 1, 1), dtype=np.uint8)

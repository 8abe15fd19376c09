"""Decoding image files into the uint8 arrays the models take (Pillow only: no torch).

:func:`load_image` turns an image file (path, bytes or file object) into a ``uint8`` array
``(C, image_size, image_size)``: the same layout as the MedMNIST arrays the models were trained
on. The network-side half (float, resize, normalisation) is :class:`zoo.preprocess.adapter.InputAdapter`,
inside every exported model.

Mode rules (documented in the README, tested one by one):

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

Refused with :class:`~zoo.errors.ImageError`: empty, truncated, corrupt or non-image data, images
above ``MAX_PIXELS`` (decompression bombs); multi-frame files beyond the first frame are ignored.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from zoo.errors import ImageError
from zoo.preprocess.spec import Preprocessing

# A 224 px model never needs more than this; a larger upload is refused before it is decoded.
MAX_PIXELS = 64_000_000


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


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, read without decoding its pixels (for limits checked first)."""

    format: str  # Pillow's format name ("PNG", "JPEG", "TIFF", "BMP", …)
    width: int
    height: int
    frames: int = 1
    mode: str = ""

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _open_source(src: str | os.PathLike[str] | bytes | BinaryIO) -> Any:
    """A file name or file object for Pillow; empty input is refused here."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError("empty file", "empty")
        return io.BytesIO(bytes(src))
    if isinstance(src, (str, os.PathLike)):
        if Path(src).stat().st_size == 0:
            raise ImageError("empty file", "empty")
    return src


def too_large(w: int, h: int, max_pixels: int) -> ImageError:
    """The refusal of an image above the pixel limit, with medzoo's own limit in the message."""
    return ImageError(f"image of {w}x{h} pixels is larger than the {max_pixels:,} pixel limit", "too_large")


def _bomb(e: Exception, max_pixels: int) -> ImageError:
    """Pillow's own decompression-bomb refusal, told with medzoo's limit (not Pillow's threshold)."""
    found = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{int(found.group(1)):,} pixels" if found else "its size"
    return ImageError(f"image of {size} is larger than the {max_pixels:,} pixel limit", "too_large")


def probe(src: str | os.PathLike[str] | bytes | BinaryIO, max_pixels: int = MAX_PIXELS) -> ImageHeader:
    """Format, size and frame count from the header alone; :class:`ImageError` when the data is not
    an image this package reads, or is larger than ``max_pixels``."""
    fp = _open_source(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
            with Image.open(fp) as img:
                w, h = img.size
                header = ImageHeader(img.format or "", w, h, int(getattr(img, "n_frames", 1) or 1), img.mode)
    except Image.DecompressionBombError as e:
        raise _bomb(e, max_pixels) from e
    except UnidentifiedImageError as e:
        raise ImageError("not an image file Pillow can read", "unsupported") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from e
    if header.pixels > max_pixels:
        raise too_large(w, h, max_pixels)
    return header


def load_image(
    src: str | os.PathLike[str] | bytes | BinaryIO, prep: Preprocessing, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Decode an image file into ``uint8 (C, image_size, image_size)`` following the mode rules."""
    fp = _open_source(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise too_large(w, h, max_pixels)
                if w == 0 or h == 0:
                    raise ImageError("image has no pixels", "empty")
                img.load()  # decode now so truncation shows here, not later
                img = convert_mode(img, prep.in_channels)
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError("not an image file Pillow can read", "unsupported") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb(e, max_pixels) from e
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

"""What an image's header says and the limits checked on it before any pixel is decoded (no Pillow,
no pydicom): shared by :mod:`zoo.preprocess.image` and :mod:`zoo.preprocess.dicom`, which import it
rather than each other."""

from __future__ import annotations

from dataclasses import dataclass

from zoo.errors import ImageError

# A 224 px model never needs more than this; a larger upload is refused before it is decoded.
MAX_PIXELS = 64_000_000
# The whole image is squashed to a square: beyond this ratio of its sides nothing recognisable is left, and
# Pillow's resize allocates coefficients in proportion to the long side (1 x 64,000,000 pixels: 1.5 GB).
MAX_ASPECT_RATIO = 20
# A display window (center, width) in the modality's units (Hounsfield units for CT): DICOM only.
Window = tuple[float, float]


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, read without decoding its pixels (for limits checked first)."""

    format: str  # Pillow's format name ("PNG", "JPEG", "TIFF", "BMP", …) or "DICOM"
    width: int
    height: int
    frames: int = 1
    mode: str = ""  # Pillow's mode; for DICOM the photometric interpretation ("MONOCHROME2", "RGB", …)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def too_large(w: int, h: int, max_pixels: int) -> ImageError:
    """The refusal of an image above the pixel limit, with medzoo's own limit in the message."""
    return ImageError(f"image of {w}x{h} pixels is larger than the {max_pixels:,} pixel limit", "too_large")


def check_size(w: int, h: int, max_pixels: int) -> None:
    """The limits read from a header: pixels, aspect ratio, not empty."""
    if w * h > max_pixels:
        raise too_large(w, h, max_pixels)
    if w == 0 or h == 0:
        raise ImageError("image has no pixels", "empty")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ImageError(f"image of {w}x{h} pixels has an aspect ratio above the {MAX_ASPECT_RATIO}:1 limit "
                         f"(the whole image is resized to a square)", "too_large")


__all__ = ["MAX_ASPECT_RATIO", "MAX_PIXELS", "ImageHeader", "Window", "check_size", "too_large"]

"""Heat maps as images: the colour map alone and blended on the image, at a size one can see
(a 28 px MedMNIST image is upsampled to 224 px), as PNG bytes.

The blend is pytorch-grad-cam's ``show_cam_on_image`` (OpenCV's JET colour map); the heat map
alone uses the same colour map, so the two pictures read the same.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image
from pytorch_grad_cam.utils.image import show_cam_on_image

VIEW_SIZE = 224  # side of the pictures, unless the image is larger
IMAGE_WEIGHT = 0.5  # share of the image in the overlay


def view_size(image_size: int) -> int:
    """Side of the pictures for images of ``image_size`` pixels."""
    return max(VIEW_SIZE, int(image_size))


def _rgb(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (C, H, W), C = 1 or 3 → float RGB (size, size, 3) in [0, 1]."""
    pil = Image.fromarray(image[0]) if image.shape[0] == 1 else Image.fromarray(np.ascontiguousarray(
        image.transpose(1, 2, 0)))
    pil = pil.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(pil, dtype=np.float32) / 255.0


def _resize(heat: np.ndarray, size: int) -> np.ndarray:
    """A (H, W) map in [0, 1] resized bilinearly to (size, size)."""
    pil = Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32))
    return np.clip(np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR)), 0.0, 1.0)


def colour_map(heat: np.ndarray, size: int | None = None) -> np.ndarray:
    """The heat map (H, W) in [0, 1] in colour: uint8 RGB (size, size, 3)."""
    size = size or view_size(heat.shape[-1])
    bgr = cv2.applyColorMap(np.uint8(np.round(255 * _resize(heat, size))), cv2.COLORMAP_JET)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def overlay(image: np.ndarray, heat: np.ndarray, size: int | None = None,
            image_weight: float = IMAGE_WEIGHT) -> np.ndarray:
    """The heat map blended on the uint8 (C, H, W) image: uint8 RGB (size, size, 3)."""
    size = size or view_size(image.shape[-1])
    return show_cam_on_image(_rgb(image, size), _resize(heat, size), use_rgb=True, image_weight=image_weight)


def png_bytes(rgb: np.ndarray) -> bytes:
    """A uint8 (H, W, 3) or (H, W) array as PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


__all__ = ["IMAGE_WEIGHT", "VIEW_SIZE", "colour_map", "overlay", "png_bytes", "view_size"]

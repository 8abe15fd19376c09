"""The one preprocessing definition: documented mode rules, refusals, adapter maths."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.preprocess import MAX_PIXELS, ImageError, Preprocessing, load_image
from zoo.preprocess.adapter import InputAdapter

GREY = Preprocessing(28, 28, 1, (0.5,), (0.25,))
RGB = Preprocessing(28, 28, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_grey_png_roundtrip_is_exact() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    assert np.array_equal(load_image(_png(Image.fromarray(arr, "L")), GREY)[0], arr)


def test_rgb_to_grey_is_pillow_luma_and_grey_to_rgb_repeats() -> None:
    arr = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    assert np.array_equal(load_image(_png(img), GREY)[0], np.asarray(img.convert("L")))
    grey = load_image(_png(img.convert("L")), RGB)
    assert grey.shape == (3, 28, 28) and np.array_equal(grey[0], grey[2])


def test_alpha_composited_over_black() -> None:
    rgba = Image.new("RGBA", (28, 28), (200, 100, 50, 0))  # fully transparent
    assert load_image(_png(rgba), RGB).max() == 0
    opaque = Image.new("RGBA", (28, 28), (200, 100, 50, 255))
    assert tuple(load_image(_png(opaque), RGB)[:, 0, 0]) == (200, 100, 50)


def test_palette_cmyk_16bit_and_bilevel() -> None:
    pal = Image.new("RGB", (28, 28), (10, 200, 30)).convert("P")
    assert load_image(_png(pal), RGB).shape == (3, 28, 28)
    cmyk = Image.new("CMYK", (28, 28), (0, 255, 255, 0))
    assert next(iter(load_image(_png(cmyk, "JPEG"), RGB)[:, 5, 5])) > 200  # red
    wide = np.linspace(1000, 3000, 28 * 28).reshape(28, 28).astype(np.uint16)
    out = load_image(_png(Image.fromarray(wide)), GREY)[0]
    assert out.min() == 0 and out.max() == 255  # min..max scaled to 8 bits
    assert load_image(_png(Image.new("1", (28, 28), 1)), GREY).max() == 255


def test_resize_to_image_size() -> None:
    big = Image.new("L", (300, 200), 128)
    assert load_image(_png(big), GREY).shape == (1, 28, 28)


@pytest.mark.parametrize(
    "data,message",
    [(b"", "empty"), (b"hello, not an image", "not an image"),
     (_png(Image.new("L", (64, 64), 9))[:60], "corrupt or truncated")],
)
def test_refusals(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(data, GREY)


def test_decompression_bomb_refused_before_decoding() -> None:
    side = int(MAX_PIXELS**0.5) + 100
    bomb = _png(Image.new("1", (side, side)))  # tiny file, huge canvas
    with pytest.raises(ImageError, match="pixel limit|decompression bomb"):
        load_image(bomb, GREY)


def test_adapter_normalises_and_resizes() -> None:
    prep = Preprocessing(28, 56, 1, (0.5,), (0.25,))
    x = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    y = InputAdapter(prep)(x)
    assert y.shape == (2, 1, 56, 56) and torch.allclose(y, torch.full_like(y, 2.0))
    assert torch.allclose(InputAdapter(prep)(x.float() / 255), y)  # float input is taken as [0, 1]


def test_float_image_nan_pixels_do_not_blacken_it() -> None:
    """Min..max scaling uses finite pixels only; an image with none is refused."""
    arr = np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(28, 28)
    arr[0, 0] = np.nan
    out = load_image(_png(Image.fromarray(arr, "F"), "TIFF"), GREY)[0]
    assert out.max() == 255 and out[0, 0] == 0 and out[27, 27] == 255
    with pytest.raises(ImageError, match="finite") as e:
        load_image(_png(Image.fromarray(np.full((28, 28), np.nan, np.float32), "F"), "TIFF"), GREY)
    assert e.value.kind == "corrupt"


@pytest.mark.parametrize("data,kind", [(b"", "empty"), (b"text", "unsupported")])
def test_refusal_kinds(data: bytes, kind: str) -> None:
    with pytest.raises(ImageError) as e:
        load_image(data, GREY)
    assert e.value.kind == kind

"""The one preprocessing definition: documented mode rules, refusals, adapter maths."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.preprocess import MAX_PIXELS, ImageError, ImageTransform, Preprocessing, load_image, probe
from zoo.preprocess.adapter import InputAdapter
from zoo.preprocess.image import tiff_codec_available

REPO = Path(__file__).resolve().parents[1]
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


# --- hardening: memory, limits, codecs -------------------------------------------------------

_MEASURE = """
import sys, numpy as np
from zoo.preprocess import Preprocessing, load_image
data = open(sys.argv[1], "rb").read()
prep = Preprocessing(28, 28, 3, (0.5,) * 3, (0.25,) * 3)
load_image(data[:0] or open(sys.argv[2], "rb").read(), prep)  # warm-up: plugins imported
def hwm():  # peak RSS of this process image, kB (ru_maxrss would carry the parent's over exec)
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1])
before = hwm()
out = load_image(data, prep)
after = hwm()
np.save(sys.argv[3], out)
print((after - before) // 1024)
"""


def _peak_growth_mb(path: Path, tmp_path: Path) -> tuple[int, np.ndarray]:
    """Peak RSS growth (MB) of one load_image call in a fresh interpreter, and its result."""
    small = tmp_path / "warm.png"
    Image.new("RGB", (8, 8)).save(small)
    out = tmp_path / "out.npy"
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(small), str(out)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1]), np.load(out)


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS read from Linux /proc")


@pytest.fixture(scope="module")
def big_16bit_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 7999 x 7999 16-bit grey PNG (a horizontal 0..65535 ramp, ~150 kB): inside every limit."""
    path = tmp_path_factory.mktemp("big") / "ramp16.png"
    ramp = np.linspace(0, 65535, 7999).astype(np.uint16)
    Image.fromarray(np.ascontiguousarray(np.broadcast_to(ramp, (7999, 7999)))).save(path, compress_level=6)
    return path


@needs_proc
def test_64mp_16bit_png_decodes_in_bounded_memory(big_16bit_png: Path, tmp_path: Path) -> None:
    """The issue's 16-bit 7999 x 7999 PNG used to take ~2.1 GB (full-size float64 and RGBA copies).
    Now: the decoded 16-bit image (128 MB) and no full-size copy in a wider type."""
    assert Image.open(big_16bit_png).mode.startswith("I;16")
    growth, out = _peak_growth_mb(big_16bit_png, tmp_path)
    assert growth < 300, f"peak RSS grew by {growth} MB"
    assert out.shape == (3, 28, 28) and np.array_equal(out[0], out[2])
    row = out[0, 14].astype(int)
    assert (np.diff(row) > 0).all() and row[0] < 10 and row[-1] > 245  # the ramp, min..max scaled
    assert (out[0] == out[0, :1]).all()  # every row the same


@needs_proc
def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path: Path) -> None:
    """An 8000 x 6000 JPEG: decoded through draft (1/8 scale), a few MB instead of ~190 MB, and the
    same picture as a full decode resized."""
    ramp = np.linspace(0, 255, 8000).astype(np.uint8)
    arr = np.stack([np.broadcast_to(ramp, (6000, 8000)), np.broadcast_to(ramp[::-1], (6000, 8000)),
                    np.full((6000, 8000), 90, np.uint8)], axis=-1)
    path = tmp_path / "big.jpg"
    Image.fromarray(arr).save(path, quality=92)
    del arr
    growth, out = _peak_growth_mb(path, tmp_path)
    assert growth < 60, f"peak RSS grew by {growth} MB"
    full = np.asarray(Image.open(path).convert("RGB").resize((28, 28), Image.Resampling.BILINEAR))
    assert np.abs(out.transpose(1, 2, 0).astype(int) - full).mean() < 2


def test_wide_grey_float_with_nonfinite_pixels_large_and_callers_image_untouched() -> None:
    arr = np.tile(np.linspace(-5, 5, 300, dtype=np.float32), (200, 1))
    arr[10, 10], arr[20, 20], arr[30, 30] = np.nan, np.inf, -np.inf
    img = Image.fromarray(arr, "F")
    out = load_image(img, GREY)[0]
    assert out[:, 0].max() <= 5 and out[:, -1].min() >= 250 and out.shape == (28, 28)
    assert np.isnan(np.asarray(img)[10, 10])  # the caller's image is not altered


def test_alpha_over_black_survives_the_resize() -> None:
    """Premultiplied resize: a half-transparent white square on a transparent red field composites over
    black exactly as compositing first and resizing after."""
    rgba = Image.new("RGBA", (280, 280), (255, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (140, 140), (255, 255, 255, 128)), (70, 70))
    composited = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    expected = np.asarray(composited.resize((28, 28), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    out = load_image(_png(rgba), RGB)
    assert np.abs(out.astype(int) - expected).max() <= 1
    assert out[0].max() <= 129  # the invisible red never bleeds in


def test_pixel_budget_is_the_callers_and_checked_before_decoding() -> None:
    data = _png(Image.new("L", (200, 100), 9))
    with pytest.raises(ImageError, match="200x100 pixels is larger than the 10,000 pixel limit") as e:
        load_image(data, GREY, max_pixels=10_000)
    assert e.value.kind == "too_large"
    with pytest.raises(ImageError) as e:
        probe(data, max_pixels=10_000)
    assert e.value.kind == "too_large"
    assert probe(data).pixels == 20_000
    # truncated pixel data but an intact header: refused by size before decoding fails
    with pytest.raises(ImageError, match="pixel limit"):
        load_image(data[:120], GREY, max_pixels=10_000)


@pytest.mark.parametrize("side", [9_500, 13_500])  # above Pillow's warning (89 MP), above its error (179 MP)
def test_bomb_messages_tell_our_limit_not_pillows(side: int) -> None:
    bomb = _png(Image.new("1", (side, side)))
    for fn in (lambda: load_image(bomb, GREY), lambda: probe(bomb)):
        with pytest.raises(ImageError) as e:
            fn()
        assert e.value.kind == "too_large"
        assert f"{MAX_PIXELS:,} pixel limit" in str(e.value), str(e.value)
        assert "89478485" not in str(e.value) and "178956970" not in str(e.value)


def _tiff_with_compression(code: int) -> bytes:
    """A real deflate TIFF whose compression tag is rewritten (first IFD, little endian)."""
    buf = io.BytesIO()
    Image.new("L", (64, 64), 7).save(buf, "TIFF", compression="tiff_adobe_deflate")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == 259:
            data[entry + 8 : entry + 10] = struct.pack("<H", code)
    return bytes(data)


def test_tiff_codec_not_built_in_is_unsupported_with_the_reason() -> None:
    """A TIFF compressed with a codec this libtiff lacks: 415-kind refusal naming it, not
    "decoder error -2"."""
    codes = {"webp": 50001, "zstd": 50000, "lzma": 34925}
    missing = [name for name in codes if not tiff_codec_available(name)]
    if not missing:
        pytest.skip("this Pillow's libtiff decodes WebP, ZSTD and LZMA")
    data = _tiff_with_compression(codes[missing[0]])
    for fn in (lambda: load_image(data, GREY), lambda: probe(data)):
        with pytest.raises(ImageError, match=f"TIFF compressed with '{missing[0]}'") as e:
            fn()
        assert e.value.kind == "unsupported" and "decoder error" not in str(e.value)


def test_tiff_codec_unknown_to_pillow_is_named() -> None:
    data = _tiff_with_compression(34712)  # JPEG 2000 in TIFF (whole-slide scanners write it)
    for fn in (lambda: load_image(data, GREY), lambda: probe(data)):
        with pytest.raises(ImageError, match="JPEG 2000 \\(compression code 34712\\)") as e:
            fn()
        assert e.value.kind == "unsupported"


# --- decoded images and arrays ----------------------------------------------------------------


def test_pil_image_input_same_as_its_file() -> None:
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 40, 3), dtype=np.uint8), "RGB")
    assert np.array_equal(load_image(img, RGB), load_image(_png(img), RGB))
    assert np.array_equal(load_image(img.convert("P"), GREY), load_image(_png(img.convert("P")), GREY))


def test_numpy_layouts_and_types() -> None:
    rng = np.random.default_rng(4)
    hwc = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    expected = load_image(Image.fromarray(hwc, "RGB"), RGB)
    assert np.array_equal(load_image(hwc, RGB), expected)  # (H, W, C)
    assert np.array_equal(load_image(hwc.transpose(2, 0, 1), RGB), expected)  # (C, H, W)
    assert np.array_equal(load_image(np.asfortranarray(hwc), RGB), expected)
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    for arr in (grey, grey[None], grey[..., None]):
        assert np.array_equal(load_image(arr, GREY)[0], grey)
    assert np.array_equal(load_image(grey, RGB), np.stack([grey] * 3))
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0
    assert load_image(rgba, RGB).max() == 0  # alpha over black
    wide = np.linspace(1000, 3000, 28 * 28).reshape(28, 28).astype(np.uint16)
    assert np.array_equal(load_image(wide, GREY), load_image(_png(Image.fromarray(wide)), GREY))
    signed = (wide.astype(np.int32) - 2000).astype(np.int16)
    assert np.array_equal(load_image(signed, GREY), load_image(wide, GREY))  # min..max: offset-free
    assert set(np.unique(load_image(grey > 128, GREY))) == {0, 255}


@pytest.mark.parametrize("arr,message", [
    (np.zeros((2, 3, 28, 28), np.uint8), "batch of images"),
    (np.zeros((28, 28, 5), np.uint8), "no channel axis"),
    (np.zeros((28, 28, 3), np.float32), "must be uint8"),
    (np.zeros((28, 28), np.complex64), "not supported"),
])
def test_numpy_refusals(arr: np.ndarray, message: str) -> None:
    with pytest.raises(ImageError, match=message) as e:
        load_image(arr, RGB)
    assert e.value.kind == "unsupported"


def test_image_transform_is_load_image_bound_to_a_preprocessing() -> None:
    transform = ImageTransform(RGB)
    img = Image.new("RGB", (64, 64), (10, 20, 30))
    assert np.array_equal(transform(img), load_image(img, RGB))
    assert "uint8 (3, 28, 28)" in repr(transform)

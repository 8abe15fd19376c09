"""Seeded mutations of real image files, for the fuzz tests (tests/test_fuzz.py, tests/test_serving.py).

Seeds are real files shipped by packages: scikit-image's sample images (PNG, JPEG and multi-page
TIFF), re-encoded small by Pillow in the variants each format has (modes, compressions, progressive
JPEG, palette / RLE BMP, 16-bit and float TIFF), and pydicom's test DICOMs (uncompressed, RLE, JPEG,
JPEG-LS, JPEG 2000, big endian, without preamble). Mutations are what a damaged transfer or a hostile
client produces: bit flips, overwritten bytes with boundary values, 16/32-bit fields set to extremes
near the header, truncation, removed, duplicated and inserted blocks.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = ("png", "jpeg", "tiff", "bmp", "dicom")
_SKIMAGE_FILES = ("camera.png", "astronaut.png", "coins.png", "retina.jpg", "rocket.jpg", "multipage.tif")
_DICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
                "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_rle.dcm",
                "examples_palette.dcm", "SC_ybr_full_422_uncompressed.dcm")


def _real_images() -> list[Image.Image]:
    """scikit-image's sample pictures, reduced to 48 px (the mutated files must decode in milliseconds)."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    out = []
    for name in _SKIMAGE_FILES[:5]:
        with Image.open(folder / name) as img:
            out.append(img.convert("RGB").resize((48, 40)))
    return out


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def seed_files() -> dict[str, list[bytes]]:
    """Real files per format (see the module docstring)."""
    import pydicom.data
    import skimage

    pics = _real_images()
    grey = [p.convert("L") for p in pics]
    wide = Image.fromarray(np.asarray(grey[0], dtype=np.uint16) * 257)
    tiffs = [(Path(skimage.__file__).parent / "data" / n).read_bytes() for n in _SKIMAGE_FILES[5:]]
    seeds = {
        "png": [_encode(pics[0], "PNG"), _encode(grey[1], "PNG", optimize=True), _encode(pics[2].convert("P"), "PNG"),
                _encode(pics[3].convert("RGBA"), "PNG"), _encode(wide, "PNG"), _encode(grey[4].convert("1"), "PNG")],
        "jpeg": [_encode(pics[0], "JPEG", quality=90), _encode(grey[1], "JPEG"),
                 _encode(pics[2], "JPEG", progressive=True), _encode(pics[3].convert("CMYK"), "JPEG"),
                 _encode(pics[4], "JPEG", subsampling=0)],
        "tiff": [*tiffs, _encode(pics[0], "TIFF", compression="tiff_lzw"),
                 _encode(grey[1], "TIFF", compression="packbits"),
                 _encode(wide, "TIFF", compression="tiff_adobe_deflate"),
                 _encode(Image.fromarray(np.asarray(grey[2], dtype=np.float32) / 7), "TIFF"),
                 _encode(pics[3].convert("CMYK"), "TIFF")],
        "bmp": [_encode(pics[0], "BMP"), _encode(grey[1], "BMP"), _encode(pics[2].convert("P"), "BMP"),
                _encode(pics[3].convert("1"), "BMP"), _encode(pics[4].convert("RGBA"), "BMP")],
        "dicom": [Path(pydicom.data.get_testdata_file(n)).read_bytes() for n in _DICOM_FILES],
    }
    return seeds


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One seeded mutation of ``data`` (module docstring)."""
    b = bytearray(data)
    n = len(b)
    op = int(rng.integers(8))
    if op == 0:  # a few bit flips anywhere
        for i in rng.integers(0, n, size=int(rng.integers(1, 9))):
            b[i] ^= 1 << int(rng.integers(8))
    elif op == 1:  # boundary bytes near the header
        for i in rng.integers(0, min(n, 512), size=int(rng.integers(1, 5))):
            b[i] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFE, 0xFF]))
    elif op == 2:  # a 16- or 32-bit field near the header set to an extreme
        width = int(rng.choice([2, 4]))
        i = int(rng.integers(0, max(1, min(n, 1024) - width)))
        value = int(rng.choice([0, 1, 2**(8 * width) - 1, 2**(8 * width - 1), 2**(8 * width - 1) - 1, 65535]))
        b[i:i + width] = struct.pack("<H" if width == 2 else "<I", value)
    elif op == 3:  # truncation
        del b[int(rng.integers(1, max(2, n))):]
    elif op == 4:  # a removed block
        i = int(rng.integers(0, n))
        del b[i:i + int(rng.integers(1, 256))]
    elif op == 5:  # a duplicated block
        i = int(rng.integers(0, n))
        b[i:i] = b[i:i + int(rng.integers(1, 256))]
    elif op == 6:  # inserted random bytes
        i = int(rng.integers(0, n))
        b[i:i] = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    else:  # a random run overwritten in the body
        i = int(rng.integers(0, n))
        run = rng.integers(0, 256, size=int(rng.integers(1, 128)), dtype=np.uint8).tobytes()
        b[i:i + len(run)] = run
    return bytes(b)


def corpus(fmt: str, n: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """``n`` mutated files of one format, named ``<fmt>-<i>``, the same for the same seed."""
    rng = np.random.default_rng([seed, FORMATS.index(fmt)])
    seeds = seed_files()[fmt]
    for i in range(n):
        data = seeds[i % len(seeds)]
        for _ in range(int(rng.integers(1, 4))):  # one to three mutations stacked
            if data:
                data = mutate(data, rng)
        yield f"{fmt}-{i}", data

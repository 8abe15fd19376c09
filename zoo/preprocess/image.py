"""Decoding images into the uint8 arrays the models take (Pillow and pydicom: no torch).

:func:`load_image` turns an image — a file (path, bytes or binary file object) in any format
Pillow reads or DICOM, a ``PIL.Image``, a pydicom ``Dataset`` or a numpy array — into a ``uint8``
array ``(C, image_size, image_size)``: the layout of the MedMNIST arrays the models were trained
on. The network-side half (float, resize, normalisation) is
:class:`zoo.preprocess.adapter.InputAdapter`, inside every exported model. :class:`ImageTransform`
is :func:`load_image` bound to one model's :class:`~zoo.preprocess.spec.Preprocessing`.

Mode rules (documented in the README, tested one by one):

* palette (``P``), ``LA``, ``RGBA``, ``PA``: alpha is composited over **black** (MedMNIST
  backgrounds are dark), then converted as below;
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: converted to RGB by Pillow;
* 16-bit and 32-bit grey (``I;16*``, ``I``, ``F``): scaled linearly from the image's own
  min..max (taken over the full-resolution image) to 0..255 (medical exports are often
  12/16-bit and rarely use the full range); in float images non-finite pixels are left out of
  min..max and count as the minimum (NaN, -inf) or the maximum (+inf); an image with no finite
  pixel is refused;
* ``1`` (bilevel): 0/255;
* DICOM: see :mod:`zoo.preprocess.dicom` (rescale, VOI LUT or window, MONOCHROME1 inverted,
  YBR and palette colour to RGB), then as 8-bit grey or RGB;
* RGB image for a grey model: ITU-R 601-2 luma (Pillow's ``L``); grey image for an RGB model:
  the grey channel repeated three times;
* the whole image is resized (bilinear, antialiased, no crop) to ``image_size`` × ``image_size``.

Arrays: ``(H, W)`` grey, or ``(H, W, C)`` / ``(C, H, W)`` with C = 1, 3 (RGB) or 4 (RGBA); the
last axis holds the channels when it has 1, 3 or 4 entries, else the first. ``uint8`` any shape;
grey arrays may also be ``uint16``, signed or unsigned integers or floats (the 16/32-bit rule).

Memory: no full-size float64 (or other widened) copy is made. JPEGs are decoded at a reduced
scale (``draft``: 1/2 … 1/8 while at least twice the model's size); 16/32-bit grey images are
resized in their own mode and scaled to 8 bits afterwards (linear, so the order does not change
the result beyond rounding); alpha is premultiplied (= composited over black) and resized
before it is dropped. The pixel budget ``max_pixels`` is checked from the header, before any
pixel is decoded.

Refused with :class:`~zoo.errors.ImageError` (``kind`` in brackets): empty data [empty]; not an
image, a codec this installation cannot decode (a TIFF compression libtiff was built without,
a compressed DICOM transfer syntax no installed handler decodes), multi-frame DICOM
[unsupported]; above ``max_pixels`` (decompression bombs) [too_large]; truncated or corrupt data
[corrupt]. Of other multi-frame files (GIF, TIFF) the first frame is used.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import struct
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Union

import numpy as np
from PIL import Image, TiffImagePlugin, UnidentifiedImageError

from zoo.errors import ImageError, UsageError
from zoo.preprocess.header import MAX_PIXELS, ImageHeader, Window, check_size
from zoo.preprocess.spec import Preprocessing

if TYPE_CHECKING:
    from pydicom import Dataset

# Frames are counted by walking them (40,000 one-pixel TIFF pages: 21 s); the count stops here, and a file
# with more is refused before anything is decoded. Only the first frame is ever used.
MAX_FRAMES = 256
# The file formats read, as Pillow names them (DICOM through pydicom). One rule for every front end
# (service, zoo score, Python API): Pillow's other decoders are never run on a client's bytes.
PILLOW_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
# What a header may then say: Pillow's JPEG reader names a JPEG with extra pictures "MPO".
ACCEPTED_FORMATS = frozenset((*PILLOW_FORMATS, "MPO", "DICOM"))
FORMATS_TEXT = "PNG, JPEG, TIFF, BMP or DICOM"

# What load_image takes: a file (path, bytes, binary file object), a decoded image or an array.
ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image, np.ndarray, "Dataset"]

_DICOM_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD",
              b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI",
              b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}
WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_STRIP_PIXELS = 1 << 20  # pixels per strip when a full-resolution pass is needed (bounded memory)
# TIFF compressions libtiff may be built without (Pillow's names): refused as unsupported when absent.
_OPTIONAL_TIFF_CODECS = ("jpeg", "lzma", "zstd", "webp")
# Compression codes Pillow does not know at all (it cannot open such a TIFF); named in the refusal.
_TIFF_CODEC_NAMES = {33003: "Aperio JPEG 2000", 33005: "Aperio JPEG 2000", 34712: "JPEG 2000", 34887: "LERC",
                     34892: "lossy JPEG (DNG)", 50002: "JPEG XL", 52546: "JPEG XL"}


# ---------------------------------------------------------------------------------------------
# sources and limits


def _open_source(src: str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO) -> Any:
    """A seekable binary file object or a path; empty input is refused here."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError("empty file", "empty")
        return io.BytesIO(bytes(src))
    if isinstance(src, (str, os.PathLike)):
        if Path(src).stat().st_size == 0:
            raise ImageError("empty file", "empty")
        return src
    if not getattr(src, "seekable", lambda: False)():
        return _open_source(src.read())  # a pipe or socket: read it (byte limits are the caller's)
    return src  # read from its start, whatever its position (as Pillow's Image.open does)


def _head(fp: Any, n: int = 132) -> bytes:
    """The first ``n`` bytes of a path or file object (the file position is left unchanged)."""
    if isinstance(fp, (str, os.PathLike)):
        with open(fp, "rb") as f:
            return f.read(n)
    with _keep_position(fp) as f:
        f.seek(0)  # _open_source gives file objects that start at 0
        head = f.read(n)
    if not head:
        raise ImageError("empty file", "empty")
    return head


def _bomb(e: Exception, max_pixels: int) -> ImageError:
    """Pillow's own decompression-bomb refusal, told with medzoo's limit (not Pillow's threshold)."""
    found = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{int(found.group(1)):,} pixels" if found else "its size"
    # Pillow refuses at open above 2 × Image.MAX_IMAGE_PIXELS whatever our limit; say the lower one.
    pillow = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else max_pixels
    return ImageError(f"image of {size} is larger than the {min(max_pixels, pillow):,} pixel limit", "too_large")


# Peak memory of decoding one image, bytes per pixel of its header's size and mode: the decoded image plus
# the copies its mode rules make (measured on 12- and 64-megapixel files; tests/test_decoding.py checks
# that the estimate, with its 1/8 margin, bounds the measured peak).
_DECODE_BYTES_PER_PIXEL = {"1": 2, "L": 1, "P": 5, "RGB": 4, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2,
                           "I": 4, "F": 6, "MONOCHROME1": 6, "MONOCHROME2": 6}
_DEFAULT_BYTES_PER_PIXEL = 8  # alpha, CMYK, YCbCr, LAB, colour DICOM: two full-size copies at 4 bytes


def decode_bytes(header: ImageHeader, size: int) -> int:
    """An upper bound of the memory :func:`load_image` takes to decode this image to ``size``, from
    its header: what a server budgets before it decodes. JPEGs count at their DCT-reduced size."""
    pixels = header.pixels
    if header.format in ("JPEG", "MPO"):
        scale = 8
        while scale > 1 and min(header.width, header.height) < 2 * size * scale:
            scale //= 2
        pixels = -(-header.width // scale) * -(-header.height // scale)
    return pixels * _DECODE_BYTES_PER_PIXEL.get(header.mode, _DEFAULT_BYTES_PER_PIXEL) * 9 // 8 + (2 << 20)


def is_dicom(head: bytes) -> bool:
    """The DICOM file format: a 128-byte preamble, then ``DICM``."""
    return head[128:132] == b"DICM"


def maybe_bare_dicom(head: bytes) -> bool:
    """A DICOM dataset without preamble (old ACR-NEMA style exports): the first element is in
    group 0002 (file meta) or 0008 (the first group of every image IOD), with an explicit VR or
    a plausible implicit length. Only asked of data Pillow did not recognise."""
    if len(head) < 8:
        return False
    for endian in "<>":
        group, element = struct.unpack(endian + "HH", head[:4])
        if group in (0x0002, 0x0008) and element <= 0x0020:
            implicit_len = struct.unpack(endian + "I", head[4:8])[0]
            if head[4:6] in _DICOM_VRS or implicit_len < 1 << 16:
                return True
    return False


def _is_dicom_dataset(src: Any) -> bool:
    pydicom = sys.modules.get("pydicom")  # a Dataset exists only if pydicom was imported
    return pydicom is not None and isinstance(src, pydicom.Dataset)


# ---------------------------------------------------------------------------------------------
# TIFF codecs


@functools.cache
def tiff_codec_available(compression: str) -> bool:
    """Whether this Pillow's libtiff decodes ``compression`` (Pillow's name: "webp", "zstd", …):
    a tiny image is written and read back with it once per process."""
    if compression not in _OPTIONAL_TIFF_CODECS:
        return True
    buf = io.BytesIO()
    try:
        Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, "TIFF", compression=compression)
        with Image.open(io.BytesIO(buf.getvalue())) as back:
            back.load()
    except (OSError, ValueError, KeyError, SyntaxError):
        return False
    return True


def _check_tiff_codec(img: Image.Image) -> None:
    name = img.info.get("compression", "raw")
    if img.format == "TIFF" and not tiff_codec_available(name):
        raise ImageError(f"TIFF compressed with {name!r}, a codec this installation's libtiff cannot decode "
                         f"(save it uncompressed, LZW, deflate or packbits)", "unsupported")


def _unknown_tiff(fp: Any) -> ImageError | None:
    """The refusal of a TIFF Pillow cannot open because of its compression; None if not that."""
    head = _head(fp, 16)
    if head[:4] not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return None
    try:
        ifd = TiffImagePlugin.ImageFileDirectory_v2(head[:16] if head[2] == 43 else head[:8])
        with (open(fp, "rb") if isinstance(fp, (str, os.PathLike)) else _keep_position(fp)) as f:
            f.seek(ifd.next)
            ifd.load(f)
        code = int(ifd.get(259, 1))
    except (OSError, SyntaxError, ValueError, TypeError, EOFError):
        return None
    if code in TiffImagePlugin.COMPRESSION_INFO:
        return None
    name = _TIFF_CODEC_NAMES.get(code, "an unknown method")
    return ImageError(f"TIFF compressed with {name} (compression code {code}), which Pillow cannot decode "
                      f"(save it uncompressed, LZW, deflate or packbits)", "unsupported")


class _keep_position:  # noqa: N801 - used as a context manager like open()
    """A file object whose position is restored on exit (the caller's object stays usable)."""

    def __init__(self, fp: BinaryIO) -> None:
        self.fp, self.pos = fp, fp.tell()

    def __enter__(self) -> BinaryIO:
        return self.fp

    def __exit__(self, *exc: object) -> None:
        self.fp.seek(self.pos)


# ---------------------------------------------------------------------------------------------
# probe: the header only


def probe(src: str | os.PathLike[str] | bytes | BinaryIO, max_pixels: int = MAX_PIXELS) -> ImageHeader:
    """Format, size and frame count from the header alone (DICOM included); :class:`ImageError`
    when the data is not an image this package reads, or is above the limits (pixels, aspect
    ratio, frames). Its cost does not grow with what the header claims."""
    fp = _open_source(src)
    head = _head(fp)
    with decoder_errors(max_pixels):
        if is_dicom(head):
            from zoo.preprocess import dicom

            return dicom.probe(fp, max_pixels, bare=False)
        try:
            with _pillow_open(fp, max_pixels) as (img, frames):
                return ImageHeader(img.format or "", *img.size, frames, img.mode)
        except UnidentifiedImageError as e:
            if maybe_bare_dicom(head):
                from zoo.preprocess import dicom

                return dicom.probe(fp, max_pixels, bare=True)
            raise _unidentified(fp, head) from e


@contextlib.contextmanager
def decoder_errors(max_pixels: int = MAX_PIXELS) -> Iterator[None]:
    """Every failure of a decoder (Pillow, pydicom and their plugins) on a file's bytes, as
    :class:`ImageError`. They raise far more than ``OSError`` on damaged data — ``TypeError``,
    ``KeyError``, ``IndexError``, ``struct.error``, ``NotImplementedError``, … (found by fuzzing) —
    and a client's file is never a server error."""
    try:
        with warnings.catch_warnings():
            # Pillow's warning threshold (89 MP) is not ours: our own limit is checked on opening.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise _bomb(e, max_pixels) from e
    except MemoryError as e:
        raise ImageError("decoding this image needs more memory than it is allowed", "too_large") from e
    except Exception as e:  # noqa: BLE001 - whatever a decoder raises on a client's bytes is the file's fault
        raise _decoder_failure(e) from e


def _decoder_failure(e: Exception) -> ImageError:
    """The refusal for a decoder's exception: a variant it does not implement (415), else damage (422)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, NotImplementedError) or "unsupported" in text.lower() or "not supported" in text.lower():
        return ImageError(f"unsupported image variant: {text}", "unsupported")
    if isinstance(e, (OSError, SyntaxError, ValueError, EOFError)):
        return ImageError(f"corrupt or truncated image: {text}")
    return ImageError(f"corrupt image: the decoder failed ({type(e).__name__}: {text})")


@contextlib.contextmanager
def _pillow_open(fp: Any, max_pixels: int) -> Iterator[tuple[Image.Image, int]]:
    """The image opened by Pillow's decoders of :data:`PILLOW_FORMATS` only (no other plugin runs on
    the bytes), its limits checked from the header; with its frame count."""
    with Image.open(fp, formats=PILLOW_FORMATS) as img:
        check_size(*img.size, max_pixels)
        _check_tiff_codec(img)
        yield img, _frame_count(img)


def _frame_count(img: Image.Image) -> int:
    """Frames of a file, walked up to :data:`MAX_FRAMES` at most (refused above); frame 0 stays selected."""
    if not getattr(img, "is_animated", False):
        return 1
    try:
        img.seek(MAX_FRAMES)
    except EOFError:
        frames = int(img.n_frames)  # the walk just found the last frame: no further seeking
    else:
        raise ImageError(f"file of more than {MAX_FRAMES} frames (pages): only the first is used, send it alone",
                         "too_large")
    img.seek(0)
    return frames


def _format_name(head: bytes) -> str | None:
    """The format Pillow would take these bytes for (its plugins' prefix checks only: nothing is parsed)."""
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(head) is True:
                return name
        except Exception:  # noqa: BLE001 - a plugin's prefix check failing means "not this format"
            continue
    return None


def _unidentified(fp: Any, head: bytes) -> ImageError:
    """The refusal of bytes no reader of :data:`ACCEPTED_FORMATS` recognised."""
    unknown_tiff = _unknown_tiff(fp)
    if unknown_tiff is not None:
        return unknown_tiff
    name = _format_name(head)
    if name is not None and name not in ACCEPTED_FORMATS:
        return ImageError(f"{name} files are not read: send {FORMATS_TEXT}", "unsupported")
    return _not_an_image()


def _not_an_image() -> ImageError:
    return ImageError(f"not an image file medzoo reads ({FORMATS_TEXT}), or a damaged one", "unsupported")


# ---------------------------------------------------------------------------------------------
# load_image: decode, mode rules, resize


def load_image(src: ImageSource, prep: Preprocessing, max_pixels: int = MAX_PIXELS,
               window: Window | None = None) -> np.ndarray:
    """Decode an image into ``uint8 (C, image_size, image_size)`` following the mode rules.

    ``src``: a path, bytes or binary file object (PNG, JPEG, TIFF, BMP or DICOM), a
    ``PIL.Image``, a pydicom ``Dataset`` or a numpy array (see the module docstring).
    ``window``: ``(center, width)`` for DICOM grey images, in the modality's units after the
    rescale (Hounsfield units for CT), used instead of the file's own VOI LUT or window; other
    images do not carry such units and ignore it. Anything refused raises :class:`ImageError`.
    """
    size, channels = prep.image_size, prep.in_channels
    if window is not None and not (len(window) == 2 and float(window[1]) > 0):
        raise UsageError(f"window must be (center, width) with a positive width, not {window!r}")
    if isinstance(src, np.ndarray):
        img = _fit(array_to_image(src, max_pixels), size, owned=True)
    elif isinstance(src, Image.Image) or _is_dicom_dataset(src):
        with decoder_errors(max_pixels):
            img = _decode_object(src, size, max_pixels, window)
    else:
        fp = _open_source(src)
        head = _head(fp)  # a missing or unreadable file raises its OSError here: not the image's fault
        with decoder_errors(max_pixels):
            img = _decode_file(fp, head, size, max_pixels, window)
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        img = img.convert(target)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def _decode_object(src: Image.Image | Dataset, size: int, max_pixels: int, window: Window | None) -> Image.Image:
    """A decoded image (``PIL.Image``) or a DICOM dataset, reduced to ``size``."""
    if isinstance(src, Image.Image):
        check_size(*src.size, max_pixels)
        src.load()  # a lazy image fails here, with the reason
        return _fit(src, size)
    from zoo.preprocess import dicom

    return _fit(dicom.to_image(src, max_pixels, window), size)


def _decode_file(fp: Any, head: bytes, size: int, max_pixels: int, window: Window | None) -> Image.Image:
    """A file's image reduced to ``size`` (L, RGB or their alpha variants), DICOM or Pillow."""
    if is_dicom(head):
        from zoo.preprocess import dicom

        return _fit(dicom.load(fp, max_pixels, window, bare=False), size, owned=True)
    try:
        with _pillow_open(fp, max_pixels) as (img, _):
            if img.format == "JPEG":
                img.draft(None, (2 * size, 2 * size))  # DCT-domain 1/2..1/8 scaling, still >= 2x size
            img.load()  # decode now so truncation shows here, not later
            return _fit(img, size, owned=True)
    except UnidentifiedImageError as e:
        if maybe_bare_dicom(head):
            from zoo.preprocess import dicom

            return _fit(dicom.load(fp, max_pixels, window, bare=True), size, owned=True)
        raise _unidentified(fp, head) from e


def _fit(img: Image.Image, size: int | None, owned: bool = False) -> Image.Image:
    """The mode rules and the resize: any mode at any size → ``L`` or ``RGB`` at ``size`` × ``size``
    (``None``: at the image's own size). ``owned``: the image was decoded here and may be altered.

    Conversions that are linear per pixel (alpha over black, 16/32-bit scaling, luma) happen on
    the resized image, so nothing is copied at full resolution in a wider type.
    """
    mode = img.mode
    if mode in WIDE_GREY:
        return _wide_to_8bit(img, size, owned)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode == "1":
        img = img.convert("L")
    if img.mode in ("RGBA", "LA"):
        # premultiplied alpha is exactly "composited over black", and resizes without halos
        img = img.convert("RGBa" if img.mode == "RGBA" else "La")
    elif img.mode not in ("L", "RGB", "RGBa", "La"):
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise ImageError(f"unsupported image mode {mode!r}: {e}", "unsupported") from e
    img = _resize(img, size)
    if img.mode == "RGBa":
        img = Image.merge("RGB", img.split()[:3])
    elif img.mode == "La":
        img = img.getchannel(0)
    return img


def _resize(img: Image.Image, size: int | None) -> Image.Image:
    if size is None or img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BILINEAR)


def convert_mode(img: Image.Image, in_channels: int) -> Image.Image:
    """The mode rules alone, at the image's own size: an ``L`` or ``RGB`` image."""
    out = _fit(img, None)
    target = "L" if in_channels == 1 else "RGB"
    return out if out.mode == target else out.convert(target)


# ---------------------------------------------------------------------------------------------
# 16/32-bit grey


def _strips(img: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """``(top row, array)`` of horizontal strips of about a megapixel: full-resolution passes
    without a full-size array."""
    w, h = img.size
    step = max(1, _STRIP_PIXELS // max(w, 1))
    for top in range(0, h, step):
        yield top, np.asarray(img.crop((0, top, w, min(h, top + step))))


def _extrema(img: Image.Image) -> tuple[float, float, bool]:
    """Finite min and max of a wide grey image, and whether it has non-finite pixels."""
    if img.mode in ("I;16", "I"):
        lo, hi = img.getextrema()  # computed by Pillow in C, no copy
        return float(lo), float(hi), False
    lo, hi, nonfinite = np.inf, -np.inf, False
    for _, a in _strips(img):
        if a.dtype.kind == "f":
            finite = np.isfinite(a)
            if not finite.all():
                nonfinite = True
                a = a[finite]
        if a.size:
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    if lo > hi:
        raise ImageError("float image without a single finite pixel value")  # decodable, but nothing usable: 422
    return lo, hi, nonfinite


def _replace_nonfinite(img: Image.Image, lo: float, hi: float, owned: bool) -> Image.Image:
    """The float image with NaN and -inf set to ``lo`` and +inf to ``hi``, strip by strip; in
    place when ``owned``, else on a copy (a caller's image is never altered)."""
    out = img if owned else img.copy()
    for top, a in _strips(img):
        if not np.isfinite(a).all():
            fixed = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo).astype(np.float32)
            out.paste(Image.fromarray(fixed, "F"), (0, top))
    return out


def _wide_to_8bit(img: Image.Image, size: int | None, owned: bool) -> Image.Image:
    """16/32-bit grey → ``L``: min..max of the full image, resize in the image's own mode, then
    scale the small image (scaling is linear, so it commutes with the bilinear resize)."""
    lo, hi, nonfinite = _extrema(img)
    if nonfinite:
        img = _replace_nonfinite(img, lo, hi, owned)
    small = np.asarray(_resize(img, size), dtype=np.float64)  # size x size: a few kB
    scaled = np.zeros_like(small) if hi <= lo else (small - lo) * (255.0 / (hi - lo))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


# ---------------------------------------------------------------------------------------------
# arrays


def _channel_axis(arr: np.ndarray) -> int | None:
    """Where the channels of an image array are: None (2-D), -1 (H, W, C) or 0 (C, H, W)."""
    if arr.ndim == 2:
        return None
    if arr.ndim == 3:
        if arr.shape[-1] in (1, 3, 4):
            return -1
        if arr.shape[0] in (1, 3, 4):
            return 0
        raise ImageError(f"an image array of shape {arr.shape} has no channel axis of 1, 3 or 4 entries "
                         f"(expected (H, W), (H, W, C) or (C, H, W))", "unsupported")
    what = "a batch of images: give them one by one (or as a list)" if arr.ndim == 4 else f"{arr.ndim} dimensions"
    raise ImageError(f"an image array of shape {arr.shape} is {what}", "unsupported")


def array_to_image(arr: np.ndarray, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A numpy image (layouts and types in the module docstring) as a ``PIL.Image`` (no resize)."""
    axis = _channel_axis(arr)
    if axis == 0:
        arr = np.moveaxis(arr, 0, -1)
    if axis is not None and arr.shape[-1] == 1:
        arr = arr[..., 0]
    h, w = arr.shape[:2]
    check_size(w, h, max_pixels)
    kind = arr.dtype.kind
    # Pillow infers the mode from the dtype and shape: L, RGB, RGBA, I;16, I (int32), F (float32)
    if arr.ndim == 3 and arr.dtype != np.uint8:
        raise ImageError(f"colour image arrays must be uint8, not {arr.dtype}", "unsupported")
    if arr.dtype in (np.uint8, np.uint16):
        return Image.fromarray(np.ascontiguousarray(arr))
    if kind == "b":
        return Image.fromarray(arr.astype(np.uint8) * 255)
    if kind in "iu" and arr.size and (int(arr.min()) < -(2**31) or int(arr.max()) >= 2**31):
        return Image.fromarray(arr.astype(np.float32))  # beyond int32: float keeps the order
    if kind in "iu":
        return Image.fromarray(arr.astype(np.int32))
    if kind == "f":
        return Image.fromarray(arr.astype(np.float32))
    raise ImageError(f"image arrays of dtype {arr.dtype} are not supported", "unsupported")


# ---------------------------------------------------------------------------------------------
# helpers for callers


@dataclass(frozen=True)
class ImageTransform:
    """:func:`load_image` bound to a model's preprocessing: ``transform(image) -> uint8 (C, H, W)``.

    What ``Model.transforms()`` returns (as torchvision's ``weights.transforms()``): the one
    preprocessing definition, usable in a dataset or a data loader.
    """

    prep: Preprocessing
    max_pixels: int = MAX_PIXELS
    window: Window | None = None

    def __call__(self, src: ImageSource) -> np.ndarray:
        return load_image(src, self.prep, self.max_pixels, self.window)

    def __repr__(self) -> str:
        p = self.prep
        window = f", DICOM window {self.window}" if self.window else ""
        return (f"ImageTransform(image -> uint8 ({p.in_channels}, {p.image_size}, {p.image_size}): mode rules of "
                f"zoo.preprocess, bilinear resize{window}; the model normalises with mean={list(p.mean)} "
                f"std={list(p.std)} and resizes to {p.input_size} itself)")


def stack_images(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Stack decoded images into a batch (N, C, H, W) uint8."""
    return np.stack(arrays, axis=0) if arrays else np.zeros((0, 1, 1, 1), dtype=np.uint8)

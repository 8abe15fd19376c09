"""DICOM images → the 8-bit grey or RGB images every other format becomes (pydicom; no torch).

Called by :func:`zoo.preprocess.load_image` and :func:`zoo.preprocess.probe` when the data is
DICOM: a ``DICM`` marker at offset 128 (the DICOM file format), or — when Pillow does not
recognise the data — a bare dataset without preamble that starts with a group 0002 or 0008
element (old ACR-NEMA style exports), whose transfer syntax is then inferred from its encoding.

Grey images (MONOCHROME1/2), in the order of the DICOM display pipeline (PS3.4 N.2):

1. the modality transform: Modality LUT, or Rescale Slope / Intercept (``apply_modality_lut``);
   CT values become Hounsfield units;
2. the VOI transform: a ``window=(center, width)`` given by the caller (e.g. a CT window in HU)
   replaces the file's; otherwise the file's VOI LUT, else its first window (``apply_voi_lut``
   semantics: a LUT is preferred to a window, LINEAR / LINEAR_EXACT / SIGMOID functions). A
   window maps to 0..255 directly; a VOI LUT's output is scaled from its own data range. With
   neither: 8-bit unsigned data without rescale is kept as is, anything else is scaled from the
   image's own min..max to 0..255 (the rule of 16-bit PNGs);
3. MONOCHROME1 (0 = white) is inverted, so that bright always means dense / high signal.

Colour: YBR_FULL / YBR_FULL_422 / YBR_ICT / YBR_RCT become RGB (pydicom and its JPEG / JPEG 2000
handlers convert them), PALETTE COLOR goes through its palette (``apply_color_lut``), RGB with more
than 8 bits is scaled from its Bits Stored range.

Refused: a transfer syntax no installed handler decodes (pydicom itself, pylibjpeg with its
libjpeg and openjpeg plugins) and multi-frame images [unsupported, 415 in the service]; DICOM files
without an image (structured reports, plans) [unsupported]; above the pixel budget [too_large];
damaged files [corrupt]. Full-resolution passes go strip by strip, so the float64 arithmetic of
pydicom's LUT functions never holds more than a strip.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing, get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import DSfloat

from zoo.errors import ImageError
from zoo.preprocess.header import ImageHeader, Window, check_size

_STRIP_PIXELS = 1 << 20
# What pydicom may raise on a damaged dataset, while reading it or reading a value from it.
_DAMAGED = (InvalidDicomError, EOFError, ValueError, OSError, struct.error, KeyError, IndexError, TypeError,
            AttributeError, OverflowError, RuntimeError)


# ---------------------------------------------------------------------------------------------
# reading


def _read(fp: Any, bare: bool, stop_before_pixels: bool) -> Dataset:
    if not isinstance(fp, (str, os.PathLike)):
        fp.seek(0)  # Pillow may have read from it already
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every non-conformance it tolerates
            ds = pydicom.dcmread(fp, force=bare, stop_before_pixels=stop_before_pixels)
    except _DAMAGED as e:
        raise ImageError(f"corrupt or truncated DICOM file: {_first_line(e)}") from e
    finally:
        if not isinstance(fp, (str, os.PathLike)):
            fp.seek(0)
    if bare and "Rows" not in ds and "PixelData" not in ds and len(ds) < 2:
        raise ImageError("not an image file medzoo can read", "unsupported")  # forced read found nothing
    return ds


def _transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax; for one without file meta, inferred from how it was read."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(ts)
    elem = ds.get("PixelData")
    if elem is not None and getattr(elem, "is_undefined_length", False):
        raise ImageError("compressed DICOM pixel data without a transfer syntax (no file meta): cannot tell "
                         "its codec", "unsupported")
    implicit, little = ds.original_encoding
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ts


def check_decodable(ts: UID) -> None:
    """Refuse, naming it, a transfer syntax no installed handler decodes."""
    name = f"{ts.name} ({ts})" if ts.name != str(ts) else str(ts)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ImageError(f"DICOM transfer syntax {name} is not supported: pydicom has no decoder for it "
                         "(convert the file to an uncompressed or JPEG / JPEG 2000 / RLE transfer syntax)",
                         "unsupported") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise ImageError(f"DICOM transfer syntax {name} cannot be decoded here: no installed handler "
                         f"decodes it ({needs})", "unsupported")


def _frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames", 1)
    return int(value) if value not in (None, "") else 1


def _check(ds: Dataset, max_pixels: int) -> ImageHeader:
    """Header facts and the refusals that need no pixel: no image, multi-frame, too large, codec."""
    if "Rows" not in ds or "Columns" not in ds:
        kind = ds.get("SOPClassUID")
        what = f" ({UID(kind).name})" if kind else ""
        raise ImageError(f"a DICOM file without an image{what}", "unsupported")
    rows, cols, frames = int(ds.Rows), int(ds.Columns), _frames(ds)
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if frames > 1:
        raise ImageError(f"multi-frame DICOM ({frames} frames) is not supported: medzoo classifies single "
                         "2D images; send one frame per file", "unsupported")
    check_size(cols, rows, max_pixels)
    check_decodable(_transfer_syntax(ds))
    return ImageHeader("DICOM", cols, rows, frames, pi)


def probe(fp: Any, max_pixels: int, bare: bool) -> ImageHeader:
    """The header of a DICOM file, read with ``stop_before_pixels`` (no pixel data is read)."""
    ds = _read(fp, bare, stop_before_pixels=True)
    try:
        return _check(ds, max_pixels)
    except ImageError:
        raise
    except _DAMAGED as e:
        raise ImageError(f"corrupt DICOM header: {_first_line(e)}") from e


def load(fp: Any, max_pixels: int, window: Window | None, bare: bool) -> Image.Image:
    """A DICOM file as an ``L`` or ``RGB`` image at full resolution."""
    return to_image(_read(fp, bare, stop_before_pixels=False), max_pixels, window)


def to_image(ds: Dataset, max_pixels: int, window: Window | None = None) -> Image.Image:
    """A dataset's image as ``L`` or ``RGB`` (the module's rules); :class:`ImageError` otherwise."""
    try:
        _check(ds, max_pixels)
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise ImageError("a DICOM file without pixel data", "unsupported")
        arr, pi = _decode(ds)
        if arr.ndim == 3 and pi in ("RGB", "YBR_FULL", "YBR_FULL_422"):
            return Image.fromarray(_colour_to_8bit(arr, ds, pi), "RGB")
        if arr.ndim == 2 and pi == "PALETTE COLOR":
            return Image.fromarray(_per_strip(arr, lambda a: _lut_to_8bit(apply_color_lut(a, ds)), 3), "RGB")
        if arr.ndim == 2 and pi in ("MONOCHROME1", "MONOCHROME2"):
            grey = grey_to_8bit(arr, ds, window)
            return Image.fromarray(255 - grey if pi == "MONOCHROME1" else grey, "L")
        raise ImageError(f"DICOM photometric interpretation {pi!r} with {arr.shape} pixels is not supported",
                         "unsupported")
    except ImageError:
        raise
    except _DAMAGED as e:
        raise ImageError(f"DICOM pixel data could not be decoded: {_first_line(e)}") from e


def _decode(ds: Dataset) -> tuple[np.ndarray, str]:
    """The first frame's pixels and their photometric interpretation after pydicom's colour
    conversion (YBR → RGB)."""
    decoder = get_decoder(_transfer_syntax(ds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr, meta = decoder.as_array(ds, index=0, raw=False, **as_pixel_options(ds))
    pi = str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation", "MONOCHROME2")))
    pi = getattr(pi, "value", pi).strip().upper()
    if pi in ("YBR_FULL", "YBR_FULL_422") and arr.ndim == 3:
        from pydicom.pixels import convert_color_space

        arr, pi = convert_color_space(arr, pi, "RGB"), "RGB"
    return arr, pi


# ---------------------------------------------------------------------------------------------
# to 8 bits


def _per_strip(arr: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], channels: int = 1) -> np.ndarray:
    """``fn`` applied to horizontal strips of ``arr`` into one uint8 array: pydicom's LUT functions
    work in float64, and a strip of a megapixel keeps that at 8 MB."""
    h, w = arr.shape[:2]
    out = np.empty((h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)
    step = max(1, _STRIP_PIXELS // max(w, 1))
    for top in range(0, h, step):
        out[top : top + step] = fn(arr[top : top + step])
    return out


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _window_dataset(center: float, width: float, function: str) -> Dataset:
    """A VOI module whose output range is 0..255 (8 bits stored, unsigned, no rescale): pydicom's
    ``apply_windowing`` then maps straight to display values."""
    voi = Dataset()
    voi.PhotometricInterpretation = "MONOCHROME2"
    voi.BitsStored, voi.PixelRepresentation = 8, 0
    voi.WindowCenter = DSfloat(center, auto_format=True)
    voi.WindowWidth = DSfloat(width, auto_format=True)
    voi.VOILUTFunction = function
    return voi


def _first(value: Any) -> float:
    """The first of a multi-valued element (several windows: the first is the default one)."""
    return float(value[0] if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else value)


def grey_to_8bit(arr: np.ndarray, ds: Dataset, window: Window | None = None) -> np.ndarray:
    """Stored grey values → uint8 display values: modality transform, then VOI (the module's rules)."""
    modality = (lambda a: apply_modality_lut(a, ds)) if _has_modality(ds) else (lambda a: a)
    if window is None and not ds.get("VOILUTSequence"):
        window = _file_window(ds)
        function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    else:
        function = "LINEAR"
    if window is not None:
        center, width = window
        if not width > 0:
            raise ImageError(f"the DICOM file's window width is {width}; it must be positive")
        voi = _window_dataset(center, max(width, 1.0) if function == "LINEAR" else width, function)
        return _per_strip(arr, lambda a: np.rint(apply_windowing(modality(a), voi)).clip(0, 255).astype(np.uint8))
    if ds.get("VOILUTSequence"):
        lo, hi = _voi_lut_range(ds)
        return _per_strip(arr, lambda a: _scale(apply_voi(np.rint(modality(a)).astype(np.int64), ds), lo, hi))
    if arr.dtype.kind == "u" and int(ds.get("BitsStored") or 0) == 8 and not _has_modality(ds):
        return _per_strip(arr, lambda a: a.astype(np.uint8))
    step = max(1, _STRIP_PIXELS // max(arr.shape[1], 1))
    ranges = [(float(v.min()), float(v.max())) for v in (modality(arr[t : t + step]) for t in range(0, len(arr), step))]
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    return _per_strip(arr, lambda a: _scale(modality(a), lo, hi))


def _file_window(ds: Dataset) -> Window | None:
    """The file's first (default) window, or None when it has none."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center in (None, "") or width in (None, ""):
        return None
    return _first(center), _first(width)


def _has_modality(ds: Dataset) -> bool:
    if ds.get("ModalityLUTSequence"):
        return True
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    return slope is not None and intercept is not None and (float(slope), float(intercept)) != (1.0, 0.0)


def _voi_lut_range(ds: Dataset) -> tuple[float, float]:
    """The output range of the first VOI LUT: the range of its data (LUTs often declare 16 bits
    and use 12)."""
    item = ds.VOILUTSequence[0]
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        little = ds.original_encoding[1] if ds.original_encoding[1] is not None else True
        values = np.frombuffer(data, dtype="<u2" if little else ">u2")
    else:
        values = np.asarray(data if isinstance(data, (list, pydicom.multival.MultiValue)) else [data])
    return float(values.min()), float(values.max())


def _lut_to_8bit(rgb: np.ndarray) -> np.ndarray:
    """A palette's output (8 or 16 bits per entry) as uint8."""
    if rgb.dtype == np.uint8:
        return rgb
    return np.rint(rgb.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)


def _colour_to_8bit(arr: np.ndarray, ds: Dataset, pi: str) -> np.ndarray:
    """RGB pixels (after pydicom's YBR conversion) as uint8, scaled from their Bits Stored range."""
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8))
    top = float(2**bits - 1)
    return _per_strip(arr, lambda a: np.rint(a.astype(np.float64) * (255.0 / top)).clip(0, 255).astype(np.uint8), 3)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())[:300]


"""DICOM input through pydicom, on the real files pydicom ships: rescale, VOI LUT and windows,
MONOCHROME1, colour spaces, compressed transfer syntaxes, refusals."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000MC, JPEGLSLossless

from zoo.preprocess import ImageError, Preprocessing, load_image, probe


def prep(size: int, channels: int = 1) -> Preprocessing:
    return Preprocessing(size, size, channels, (0.5,) * channels, (0.25,) * channels)


def data(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


def raw(name: str) -> np.ndarray:
    return pydicom.dcmread(data(name)).pixel_array


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR) onto 0..255, written out independently of pydicom."""
    c, w = center - 0.5, width - 1
    out = ((values - c) / w + 0.5) * 255
    out = np.where(values <= c - w / 2, 0, np.where(values > c + w / 2, 255, out))
    return np.rint(out).astype(np.uint8)


def test_ct_rescale_to_hounsfield_then_the_callers_window() -> None:
    """CT_small: slope 1, intercept -1024 → HU; a soft-tissue window (40, 400) given by the caller."""
    hu = raw("CT_small.dcm").astype(np.float64) * 1 - 1024
    out = load_image(data("CT_small.dcm"), prep(128), window=(40, 400))[0]
    assert np.array_equal(out, linear_window(hu, 40, 400))
    assert (out == 0).any() and (out == 255).any()  # air below the window, bone above it
    # a bone window shows the same slice differently: the window is really applied
    assert not np.array_equal(out, load_image(data("CT_small.dcm"), prep(128), window=(400, 1800))[0])


def test_ct_without_window_is_scaled_from_its_own_range() -> None:
    hu = raw("CT_small.dcm").astype(np.float64) - 1024
    out = load_image(data("CT_small.dcm"), prep(128))[0]
    expected = np.rint((hu - hu.min()) * 255 / (hu.max() - hu.min())).astype(np.uint8)
    assert np.array_equal(out, expected) and out.min() == 0 and out.max() == 255


def test_mr_uses_the_files_own_window() -> None:
    """MR_small carries Window Center 600 / Width 1600 and no rescale."""
    values = raw("MR_small.dcm").astype(np.float64)
    out = load_image(data("MR_small.dcm"), prep(64))[0]
    assert np.array_equal(out, linear_window(values, 600, 1600))
    # the caller's window wins over the file's
    assert np.array_equal(load_image(data("MR_small.dcm"), prep(64), window=(1000, 500))[0],
                          linear_window(values, 1000, 500))


def test_voi_lut_sequence_is_preferred_to_the_window() -> None:
    """A VOI LUT added to MR_small (which also has a window): the LUT is applied, then scaled
    from the LUT's own output range."""
    ds = pydicom.dcmread(data("MR_small.dcm"))
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    lut = (np.arange(4096) // 2).astype(np.uint16)  # 0..2047 (declared 12 bits, uses 11)
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data (US: its VR is ambiguous)
    ds.VOILUTSequence = [item]
    buf = io.BytesIO()
    ds.save_as(buf)
    out = load_image(buf.getvalue(), prep(64))[0]
    stored = np.clip(ds.pixel_array.astype(np.int64), 0, 4095)
    expected = np.rint(lut[stored].astype(np.float64) * 255 / 2047).astype(np.uint8)
    assert np.array_equal(out, expected)


def test_monochrome1_is_inverted_after_rescale_and_window() -> None:
    """A real computed radiograph: MONOCHROME1, 12 bits, slope 0.684, intercept 200, window 1600/2800."""
    name = "6154"
    values = raw(name).astype(np.float64) * 0.684 + 200
    out = load_image(data(name), prep(16))[0]
    assert np.array_equal(out, 255 - linear_window(values, 1600, 2800))
    assert probe(data(name)).mode == "MONOCHROME1"


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_compressed_and_other_encodings_of_the_same_image(name: str) -> None:
    """RLE, JPEG 2000, JPEG-LS (lossless; the installed pylibjpeg handlers) and big-endian / implicit VR
    encodings of MR_small decode to exactly the uncompressed result."""
    reference = load_image(data("MR_small.dcm"), prep(64))
    assert np.array_equal(load_image(data(name).read_bytes(), prep(64)), reference)


def test_bit_depths_and_modalities() -> None:
    """8-bit (deflated), 12-bit JPEG Extended, 16-bit JPEG 2000 CT, 32-bit RT dose, 1-bit segmentation."""
    img8 = raw("image_dfl.dcm")
    assert np.array_equal(load_image(data("image_dfl.dcm"), prep(512))[0], img8)  # 8-bit unsigned: as is
    nm = load_image(data("JPGExtended.dcm"), prep(28))
    assert nm.shape == (1, 28, 28) and nm.max() > 0
    ct = load_image(data("693_J2KI.dcm"), prep(512), window=(40, 100))[0]  # its own window, given again
    assert np.array_equal(ct, load_image(data("693_J2KI.dcm"), prep(512))[0])
    dose = raw("rtdose_1frame.dcm").astype(np.float64)
    out = load_image(data("rtdose_1frame.dcm"), prep(10))[0]
    assert np.array_equal(out, np.rint((dose - dose.min()) * 255 / (dose.max() - dose.min())).astype(np.uint8))
    seg = load_image(data("liver_1frame.dcm"), prep(512))[0]
    assert set(np.unique(seg)) == {0, 255} and np.array_equal(seg == 255, raw("liver_1frame.dcm") == 1)


def test_rgb_ybr_and_palette_colour() -> None:
    """The SC_rgb test pattern: lossless RLE RGB is exact; YBR_FULL JPEG and uncompressed YBR_FULL_422
    come back as RGB (close to it); 16-bit RGB is scaled to 8 bits; a palette image goes through its LUT."""
    rgb = raw("SC_rgb_rle.dcm").transpose(2, 0, 1)
    assert np.array_equal(load_image(data("SC_rgb_rle.dcm"), prep(100, 3)), rgb)
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        assert probe(data(name)).mode.startswith("YBR")
        out = load_image(data(name), prep(100, 3)).astype(int)
        assert np.abs(out - rgb).mean() < 3, name  # YCbCr left unconverted would be far off
    wide = load_image(data("SC_rgb_rle_16bit.dcm"), prep(100, 3)).astype(int)
    assert np.abs(wide - rgb).max() <= 1
    grey = load_image(data("SC_rgb_rle.dcm"), prep(100, 1))[0]  # RGB for a grey model: luma
    r, g, b = rgb.astype(np.float64)
    assert np.abs(grey - (r * 299 + g * 587 + b * 114) / 1000).max() <= 1
    palette = load_image(data("examples_palette.dcm"), prep(28, 3))
    assert palette.shape == (3, 28, 28) and len(np.unique(palette.reshape(3, -1), axis=1).T) > 10


def test_resized_to_the_models_size_and_channels() -> None:
    out = load_image(data("CT_small.dcm"), prep(28, 3))
    assert out.shape == (3, 28, 28) and out.dtype == np.uint8
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])


def test_sources_path_bytes_file_object_dataset_and_bare_dataset() -> None:
    reference = load_image(data("CT_small.dcm"), prep(64))
    with open(data("CT_small.dcm"), "rb") as f:
        assert np.array_equal(load_image(f, prep(64)), reference)
    ds = pydicom.dcmread(data("CT_small.dcm"))
    assert np.array_equal(load_image(ds, prep(64)), reference)
    # a dataset written without preamble nor file meta (ACR-NEMA style): detected, encoding inferred
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=True, enforce_file_format=False)
    bare = buf.getvalue()
    assert bare[128:132] != b"DICM"
    assert np.array_equal(load_image(bare, prep(64)), reference)
    assert probe(bare).format == "DICOM"


def test_probe_reads_the_header_only() -> None:
    h = probe(data("CT_small.dcm"))
    assert (h.format, h.width, h.height, h.frames, h.mode) == ("DICOM", 128, 128, 1, "MONOCHROME2")
    h = probe(data("JPGExtended.dcm").read_bytes())
    assert (h.width, h.height) == (256, 1024)
    # a file cut right after its header still probes (pixels are not read), and fails to load
    cut = data("CT_small.dcm").read_bytes()[:-20000]
    assert probe(cut).width == 128
    with pytest.raises(ImageError) as e:
        load_image(cut, prep(28))
    assert e.value.kind == "corrupt"


@pytest.mark.parametrize("fn", [probe, lambda src: load_image(src, prep(28))])
def test_multi_frame_refused(fn) -> None:  # noqa: ANN001
    for name, frames in (("SC_rgb_rle_2frame.dcm", 2), ("examples_ybr_color.dcm", 30)):
        with pytest.raises(ImageError, match=f"multi-frame DICOM \\({frames} frames\\)") as e:
            fn(data(name))
        assert e.value.kind == "unsupported"


def _with_transfer_syntax(name: str, ts: str) -> bytes:
    ds = pydicom.dcmread(data(name))
    ds.file_meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.mark.parametrize("fn", [probe, lambda src: load_image(src, prep(28))])
def test_transfer_syntax_without_decoder_is_unsupported_and_named(fn) -> None:  # noqa: ANN001
    """A JPEG 2000 Part 2 (multi-component) file: pydicom has no decoder for it."""
    blob = _with_transfer_syntax("MR_small_jp2klossless.dcm", JPEG2000MC)
    with pytest.raises(ImageError, match="JPEG 2000 Part 2 Multi-component") as e:
        fn(blob)
    assert e.value.kind == "unsupported"


def test_handler_not_installed_is_unsupported_with_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """JPEG-LS as on a machine without pylibjpeg-libjpeg: pydicom's decoder has no available plugin."""
    decoder = get_decoder(JPEGLSLossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg", "pylibjpeg-libjpeg")})
    with pytest.raises(ImageError, match="JPEG-LS Lossless.*pylibjpeg-libjpeg") as e:
        load_image(data("MR_small_jpeg_ls_lossless.dcm"), prep(28))
    assert e.value.kind == "unsupported"


@pytest.mark.parametrize("name,kind,message", [
    ("rtplan.dcm", "unsupported", "without an image"),
    ("MR_truncated.dcm", "corrupt", "pixel data"),
])
def test_other_refusals(name: str, kind: str, message: str) -> None:
    with pytest.raises(ImageError, match=message) as e:
        load_image(data(name), prep(28))
    assert e.value.kind == kind


def test_pixel_budget_from_the_header() -> None:
    with pytest.raises(ImageError, match="larger than the 10,000 pixel limit") as e:
        probe(data("CT_small.dcm"), max_pixels=10_000)
    assert e.value.kind == "too_large"
    with pytest.raises(ImageError) as e:
        load_image(data("CT_small.dcm"), prep(28), max_pixels=10_000)
    assert e.value.kind == "too_large"


def test_not_misdetected() -> None:
    """Data that merely starts like a DICOM element, and a PNG, are not taken for DICOM images."""
    junk = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + bytes(range(256)) * 4
    with pytest.raises(ImageError) as e:
        load_image(junk, prep(28))
    assert e.value.kind in ("unsupported", "corrupt")
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (40, 40), 7).save(buf, "PNG")
    assert probe(buf.getvalue()).format == "PNG"

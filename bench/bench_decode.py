"""Decoding large images: time and peak memory of ``zoo.preprocess.load_image`` against the
decoding it replaced, measured in the same run.

Files (made here, each inside the 64 MP limit):

* ``png16``: the issue's case, a 7999 x 7999 16-bit grey PNG (a ramp, ~150 kB on disk);
* ``jpeg``: an 8000 x 6000 RGB JPEG (a photo-sized slide or dermoscopy image);
* ``dicom``: a 7999 x 7999 16-bit CT-like DICOM (rescale -1024, window 40/400; 128 MB).

Each decode runs in a fresh interpreter (so peak RSS is its own), into a 28 px RGB model input.
Baseline: the pre-issue-10 algorithm, reproduced below — Pillow decode at full size, the 16-bit
image as a full-size float64 array (min..max over a finite mask, scaled, rounded, clipped), then
the bilinear resize; for DICOM, pydicom's ``pixel_array`` with ``apply_modality_lut`` and
``apply_voi_lut`` on the whole image (float64), the obvious way to read a DICOM.

    python bench/bench_decode.py            # ~1 min on 2 cores
    python bench/bench_decode.py --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import io, json, sys, time
import numpy as np
from PIL import Image
sys.path.insert(0, sys.argv[3])
from zoo.preprocess import Preprocessing, load_image
prep = Preprocessing(28, 28, 3, (0.5,) * 3, (0.25,) * 3)

def baseline(data):
    if data[128:132] == b"DICM":
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
        ds = pydicom.dcmread(io.BytesIO(data))
        arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(np.clip(np.rint((arr - lo) * (255 / (hi - lo))), 0, 255).astype(np.uint8), "L")
    else:
        img = Image.open(io.BytesIO(data))
        img.load()
        if img.mode.startswith("I") or img.mode == "F":  # pre-issue-10 zoo.preprocess._to_8bit
            arr = np.asarray(img, dtype=np.float64)
            finite = np.isfinite(arr)
            lo, hi = float(arr[finite].min()), float(arr[finite].max())
            scaled = np.nan_to_num((arr - lo) * (255.0 / (hi - lo)), nan=0.0, posinf=255.0, neginf=0.0)
            img = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    img = img.convert("RGB")
    return np.asarray(img.resize((28, 28), Image.Resampling.BILINEAR)).transpose(2, 0, 1)

fn = baseline if sys.argv[2] == "baseline" else lambda d: load_image(d, prep)
data = open(sys.argv[1], "rb").read()
small = io.BytesIO(); Image.new("RGB", (8, 8)).save(small, "PNG"); load_image(small.getvalue(), prep)  # plugins
if data[128:132] == b"DICM":
    import pydicom.pixels  # imported before the measure, in both
def hwm():  # peak RSS of this process image, kB (ru_maxrss would carry the parent's over exec)
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1])
before = hwm()
t = time.perf_counter()
out = fn(data)
dt = time.perf_counter() - t
after = hwm()
print(json.dumps({"s": dt, "mb": (after - before) / 1024, "mean": float(out.mean())}))
"""


def make_files(d: Path) -> dict[str, Path]:
    n = 7999
    ramp = np.linspace(0, 65535, n).astype(np.uint16)
    grey = np.ascontiguousarray(np.broadcast_to(ramp, (n, n)))
    files = {"png16": d / "ramp16.png", "jpeg": d / "photo.jpg", "dicom": d / "ct.dcm"}
    Image.fromarray(grey).save(files["png16"], compress_level=6)
    x = np.linspace(0, 255, 8000).astype(np.uint8)
    rgb = np.stack([np.broadcast_to(x, (6000, 8000)), np.broadcast_to(x[::-1], (6000, 8000)),
                    np.full((6000, 8000), 90, np.uint8)], axis=-1)
    Image.fromarray(rgb).save(files["jpeg"], quality=92)
    del rgb
    write_dicom(files["dicom"], (grey // 16).astype(np.uint16))  # 12-bit stored values
    return files


def write_dicom(path: Path, pixels: np.ndarray) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, generate_uid(), "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def measure(path: Path, which: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), which, str(REPO)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{which} on {path.name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="fresh-process runs per file and method (median)")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, "
          f"Pillow {Image.__version__}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp))
        print(f"{'file':8} {'size':>9} | {'load_image s':>12} {'MB':>6} | {'baseline s':>10} {'MB':>6} | "
              f"{'time ratio':>10} {'memory ratio':>12}")
        for name, path in files.items():
            runs: dict[str, list[dict[str, float]]] = {"new": [], "baseline": []}
            for _ in range(args.repeat):  # alternate, so that load on the shared machine hits both
                for which in runs:
                    runs[which].append(measure(path, which))
            med = {w: {k: statistics.median(r[k] for r in rs) for k in ("s", "mb")} for w, rs in runs.items()}
            new, base = med["new"], med["baseline"]
            print(f"{name:8} {path.stat().st_size / 1e6:7.1f}MB | {new['s']:12.2f} {new['mb']:6.0f} | "
                  f"{base['s']:10.2f} {base['mb']:6.0f} | {base['s'] / new['s']:9.1f}x "
                  f"{base['mb'] / max(new['mb'], 1):11.1f}x")


if __name__ == "__main__":
    main()

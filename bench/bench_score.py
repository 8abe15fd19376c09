"""Batch scoring throughput: `zoo score` against its two limits and a per-image PyTorch loop.

All measured in the same run, on the same folder of 28 px RGB PNGs (synthetic DermaMNIST-like
images) and the same bundle (ResNet-18, stem "small", trained one epoch on synthetic data, then
exported to ONNX):

* ``zoo score``: :func:`zoo.score.score_folder` end to end (listing, sessions, decode workers,
  batched ONNX Runtime, journal, output file), and its decode + inference loop alone;
* decode-only limit: the same files read and decoded with ``zoo.preprocess.load_image`` by the
  same number of worker processes, same chunking, nothing else;
* engine-only limit: ONNX Runtime on the already decoded uint8 tensors in memory, same batch
  size and threads (half the images just before, half just after each `zoo score` run, as the
  load of a shared machine drifts);
* baseline: one image at a time in PyTorch (PIL open → torchvision transforms → model →
  softmax), as a notebook would; with torch's default threads and with one thread.

Target: `zoo score` at least 0.7 of the lower limit.

    python bench/bench_score.py --quick            # ~2 min on 2 CPU cores
    python bench/bench_score.py --images 5000 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from zoo.bundle import load_bundle
from zoo.data.synthetic import synthetic_arrays, write_synthetic_medmnist
from zoo.preprocess import Preprocessing, load_image
from zoo.recipe import Recipe
from zoo.runtime import OnnxModel
from zoo.score import ensure_onnx, list_folder, score_folder
from zoo.score.decode import _decode_task, _init_worker, default_workers
from zoo.settings import runtime_options
from zoo.store import list_bundles
from zoo.train import train

TARGET = 0.7


def make_bundle(arch: str, work: Path) -> Path:
    """A ResNet (stem "small") trained one epoch on a small synthetic DermaMNIST, exported to ONNX
    (the one already in ``work`` when there is one)."""
    for path, card in list_bundles(work / "store"):
        if card.arch == arch and (path / "model.onnx").is_file():
            return path
    data = work / "data"
    write_synthetic_medmnist(data, "dermamnist", 28, (64, 16, 16), seed=0)
    recipe = Recipe.model_validate({
        "name": f"bench-score-{arch}", "dataset": "derma", "arch": arch, "report": "bench", "citation": "bench",
        "model": {"stem": "small"}, "pretrained": False,
        "train": {"epochs": 1, "batch_size": 32, "early_stopping": {"patience": None}},
        "optimizer": {"name": "adamw", "lr": 1e-3},
    })
    bundle = train(recipe, data_root=data, store=work / "store", progress=False, download=False).bundle
    ensure_onnx(bundle)
    return bundle


def make_folder(folder: Path, n: int, seed: int = 1) -> None:
    """``n`` 28 px RGB PNGs in 10 sub-folders."""
    images, _ = synthetic_arrays(n, 7, 28, 3, np.random.default_rng(seed))
    for i, arr in enumerate(images):
        path = folder / f"part{i % 10}" / f"img_{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, "RGB").save(path)


def decode_only(folder: Path, prep: Preprocessing, workers: int, chunk: int) -> float:
    """images/s of reading + decoding every file with load_image in ``workers`` processes."""
    entries = list_folder(folder)
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(str(folder), prep, os.getpid())) as pool:
        pool.submit(_decode_task, entries[:1]).result()  # workers started
        t0 = time.perf_counter()
        step = max(1, -(-chunk // workers))  # one task per worker per chunk, as zoo score does
        futures = [pool.submit(_decode_task, entries[i : i + step]) for i in range(0, len(entries), step)]
        n = sum(len(f.result().ok) for f in futures)
        seconds = time.perf_counter() - t0
    assert n == len(entries)
    return n / seconds


def engine_only(model: OnnxModel, images: np.ndarray, batch: int) -> float:
    """images/s of ONNX Runtime on tensors already in memory."""
    model.predict(images[:batch])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        model.predict(images[i : i + batch])
    return len(images) / (time.perf_counter() - t0)


def zoo_score(folder: Path, bundle: Path, out: Path, batch: int, chunk: int, workers: int,
              threads: int | None) -> tuple[float, float]:
    """(end-to-end images/s, decode+inference loop images/s) of score_folder."""
    t0 = time.perf_counter()
    s = score_folder(folder, [bundle], out, batch_size=batch, chunk_size=chunk, workers=workers,
                     options=runtime_options(threads=threads), overwrite=True, progress=False)
    seconds = time.perf_counter() - t0
    assert s.scored == s.files and s.errors == 0
    return s.files / seconds, s.images_per_s


def torch_loop(folder: Path, bundle: Path, n: int, threads: int | None = None) -> float:
    """images/s of the one-image-at-a-time PyTorch loop (PIL → torchvision transforms → model → softmax)."""
    b = load_bundle(bundle)
    prep = b.preprocessing
    tf = T.Compose([T.Resize((prep.input_size, prep.input_size)), T.ToTensor(), T.Normalize(prep.mean, prep.std)])
    files = [folder / e.rel for e in list_folder(folder)][:n]
    net = b.net.eval()
    mode = "RGB" if prep.in_channels == 3 else "L"
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            net(tf(Image.open(files[0]).convert(mode))[None])  # warm-up
            t0 = time.perf_counter()
            for f in files:
                with Image.open(f) as img:
                    x = tf(img.convert(mode))[None]
                torch.softmax(net(x), dim=1)
            return len(files) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return f"{cores} CPU cores{f' ({model})' if model else ''}, {platform.system()} {platform.machine()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2000 images, one repetition, 100-image PyTorch loop")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    ap.add_argument("--torch-images", type=int, default=300, help="images for the per-image PyTorch loop")
    ap.add_argument("--repeat", type=int, default=2, help="repetitions of each measurement (best kept)")
    ap.add_argument("--workdir", help="keep bundle and images here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args()
    if args.quick:
        args.images, args.repeat, args.torch_images = 2000, 1, 100

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        bundle = make_bundle(args.arch, work)
        folder = work / f"images_{args.images}"
        if not folder.is_dir():
            make_folder(folder, args.images)
        print(f"setup (bundle, {args.images} PNGs): {time.perf_counter() - t0:.0f} s")

        model = OnnxModel.open(bundle, runtime_options(threads=args.threads))
        prep, provider = model.preprocessing, model.provider
        arrays = np.stack([load_image(folder / e.rel, prep) for e in list_folder(folder)])
        best: dict[str, float] = {"decode": 0.0, "engine": 0.0, "score": 0.0, "score_loop": 0.0}
        half = len(arrays) // 2
        for r in range(args.repeat):
            # engine-only on half the images just before and half just after zoo score: the same
            # amount of work, bracketing it in time (the machine's load drifts)
            before = engine_only(model, arrays[:half], args.batch_size)
            score, loop = zoo_score(folder, bundle, work / "scores.csv", args.batch_size, args.chunk_size,
                                    args.workers, args.threads)
            after = engine_only(model, arrays[half:], args.batch_size)
            figures = {"decode": decode_only(folder, prep, args.workers, args.chunk_size),
                       "engine": (before + after) / 2, "score": score, "score_loop": loop}
            print(f"  run {r + 1}: decode {figures['decode']:.1f}/s  engine {before:.1f} then {after:.1f}/s  "
                  f"zoo score {score:.1f}/s (loop {loop:.1f}/s)", flush=True)
            best = {k: max(best[k], figures[k]) for k in best}
        del model
        torch_threads = torch.get_num_threads()
        best["torch_loop"] = torch_loop(folder, bundle, args.torch_images)
        best["torch_loop_1thread"] = torch_loop(folder, bundle, args.torch_images, threads=1)

    limit = min(best["decode"], best["engine"])
    ratio = best["score"] / limit
    print(f"\nBatch scoring, {args.arch} (stem small) at 28 px, {args.images} PNGs, batch {args.batch_size}, "
          f"chunk {args.chunk_size}, {args.workers} decode workers, ORT threads {args.threads or 'default'}; "
          f"{machine()}; ORT {__import__('onnxruntime').__version__}, torch {torch.__version__}")
    rows: list[tuple[str, float, str]] = [
        ("zoo score (end to end)", best["score"], ""),
        ("zoo score (decode+inference loop)", best["score_loop"], f"{best['score_loop'] / limit:.2f} x lower limit"),
        ("decode-only limit", best["decode"], f"zoo score = {best['score'] / best['decode']:.2f} x"),
        ("engine-only limit", best["engine"], f"zoo score = {best['score'] / best['engine']:.2f} x"),
        (f"per-image PyTorch loop ({torch_threads} threads)", best["torch_loop"],
         f"zoo score = {best['score'] / best['torch_loop']:.2f} x"),
        ("per-image PyTorch loop (1 thread)", best["torch_loop_1thread"],
         f"zoo score = {best['score'] / best['torch_loop_1thread']:.2f} x"),
    ]
    for name, value, note in rows:
        print(f"  {name:36s} {value:9.1f} images/s  {note}")
    verdict = "met" if ratio >= TARGET else "MISSED"
    print(f"  zoo score / lower limit = {ratio:.2f} (target {TARGET}: {verdict})")
    if args.json:
        out: dict[str, Any] = {**best, "ratio_to_limit": ratio, "images": args.images, "arch": args.arch,
                               "batch_size": args.batch_size, "workers": args.workers, "machine": machine(),
                               "provider": provider}
        print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Inference throughput of exported models: PyTorch eager vs TorchScript vs ONNX Runtime.

Images per second at batch 1 and 64 for ``simplecnn`` and ``resnet18`` (stem ``"small"``, the
MedMNIST v2 28 px setting), untrained weights, 3 channels, 28 px: the model is
:func:`zoo.bundle.full_model` (uint8 input through the ``InputAdapter``), exported exactly as
``zoo export`` does (:func:`export.onnx_export.to_onnx`, :func:`export.torchscript_export.to_torchscript`).
All three backends run in the same process with the same number of intra-op threads
(``--threads``), in alternating timed windows, and the ratios are against eager measured in the
same run. ``--size224`` adds 224 px variants (resnet18 with the
ImageNet stem, as MedMNIST at 224 px), which take minutes on a small CPU.

    python bench/bench_inference.py            # ~2 min on a 2-core CPU
    python bench/bench_inference.py --quick    # ~30 s, fewer and shorter repeats

``--providers`` names the ONNX Runtime providers (default: the environment's, ``MEDZOO_PROVIDERS``, else
the best present); ``--torch-device cuda`` runs eager and TorchScript on the GPU (the uint8 batch is
copied from the host and the logits back, as ONNX Runtime's ``session.run`` does); ``--backends``,
``--models`` and ``--json`` (rows, the provider obtained, versions) serve ``bench/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.onnx_export import to_onnx
from export.torchscript_export import load_torchscript, save_torchscript, to_torchscript
from zoo.card import ExportMeta
from zoo.io import write_json
from zoo.models import create_model
from zoo.preprocess import Preprocessing
from zoo.preprocess.adapter import full_model
from zoo.runtime import RuntimeOptions, create_session
from zoo.settings import runtime_options


@dataclass(frozen=True)
class Config:
    """One model to measure."""

    name: str
    arch: str
    size: int
    kwargs: tuple[tuple[str, str], ...] = ()


CONFIGS = [
    Config("simplecnn", "simplecnn", 28),
    Config("resnet18 (small stem)", "resnet18", 28, (("stem", "small"),)),
]
CONFIGS_224 = [
    Config("simplecnn", "simplecnn", 224),
    Config("resnet18 (ImageNet stem)", "resnet18", 224, (("stem", "imagenet"),)),
]


def throughput(runs: dict[str, Callable[[], object]], batch: int, seconds: float, repeats: int) -> dict[str, float]:
    """Median images/s of each backend over ``repeats`` rounds; in every round each backend runs
    one window of about ``seconds / repeats``, in turn, so that a change in the machine's load
    hits all of them alike."""
    calls = {}
    for name, run in runs.items():
        for _ in range(2):  # warm-up: allocations, TorchScript profiling runs, ORT arenas, TensorRT engine builds
            run()
        start = time.perf_counter()  # one call after the warm-up sets the window's length
        run()
        per_call = max(time.perf_counter() - start, 1e-6)
        calls[name] = max(1, int(seconds / repeats / per_call))
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                run()
            rates[name].append(batch * calls[name] / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


BACKENDS = ("eager", "torchscript", "onnxruntime")
LABELS = {"eager": "eager", "torchscript": "TorchScript", "onnxruntime": "ONNX Runtime"}


def _torch_call(module: torch.nn.Module, x: torch.Tensor, device: str = "cpu") -> Callable[[], object]:
    if device != "cpu":  # host batch in, host logits out (.cpu() waits for the GPU), as ORT's session.run
        def run_on_device() -> object:
            with torch.inference_mode():
                return module(x.to(device)).cpu()

        return run_on_device

    def run() -> object:
        with torch.inference_mode():
            return module(x)

    return run


def _ort_call(session: Any, name: str, x: np.ndarray) -> Callable[[], object]:
    def run() -> object:
        return session.run(None, {name: x})

    return run


def _sessions(model: torch.nn.Module, prep: Preprocessing, meta: ExportMeta, backends: tuple[str, ...],
              options: RuntimeOptions) -> tuple[Any, str, torch.nn.Module | None]:
    """The ONNX Runtime session and the provider it got, and the reloaded TorchScript file, of the
    backends asked for (None for one that is not)."""
    session, provider, scripted = None, "-", None
    with tempfile.TemporaryDirectory() as tmp:
        if "onnxruntime" in backends:
            onnx_path = Path(tmp) / "model.onnx"
            onnx_path.write_bytes(to_onnx(model, prep).SerializeToString())
            session, provider = create_session(onnx_path, options)
        if "torchscript" in backends:
            ts_path = Path(tmp) / "model.torchscript.pt"
            save_torchscript(to_torchscript(model, prep), meta, ts_path)
            scripted = load_torchscript(ts_path).module
    return session, provider, scripted


def measure(cfg: Config, batches: list[int], seconds: float, repeats: int, threads: int,
            backends: tuple[str, ...] = BACKENDS, providers: tuple[str, ...] = (),
            device: str = "cpu") -> list[dict[str, object]]:
    """images/s of the backends for one model at each batch size."""
    torch.manual_seed(0)
    prep = Preprocessing(cfg.size, cfg.size, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    net = create_model(cfg.arch, num_classes=9, in_channels=3, input_size=cfg.size, **dict(cfg.kwargs))
    model = full_model(net, prep).eval()
    meta = ExportMeta(id="bench", arch=cfg.arch, labels=[str(i) for i in range(9)], task="multi-class",
                      num_outputs=9, preprocessing=prep, weights_sha256="-", format="torchscript")
    options = runtime_options(threads=threads, **({"providers": providers} if providers else {}))
    session, provider, scripted = _sessions(model, prep, meta, backends, options)
    if device != "cpu":
        model = model.to(device)
        scripted = scripted.to(device) if scripted is not None else None
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        x = rng.integers(0, 256, (batch, 3, cfg.size, cfg.size), dtype=np.uint8)
        runs: dict[str, Callable[[], object]] = {}
        if "eager" in backends:
            runs["eager"] = _torch_call(model, torch.from_numpy(x), device)
        if scripted is not None:
            runs["torchscript"] = _torch_call(scripted, torch.from_numpy(x), device)
        if session is not None:
            runs["onnxruntime"] = _ort_call(session, session.get_inputs()[0].name, x)
        rates = throughput(runs, batch, seconds, repeats)
        rows.append({"model": cfg.name, "size": cfg.size, "batch": batch, "provider": provider, **rates})
        print(f"  {cfg.name} {cfg.size}px batch {batch}: " + ", ".join(f"{k} {v:.0f}/s" for k, v in rates.items()),
              file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, object]]) -> str:
    """Markdown table of the backends measured, with ratios against eager when it was measured."""
    present = [b for b in BACKENDS if b in rows[0]]
    head, rule = ["model", "px", "batch"], ["---", "---:", "---:"]
    for b in present:
        head += [f"{LABELS[b]} img/s"] + (["× eager"] if b != "eager" and "eager" in present else [])
    rule += ["---:"] * (len(head) - 3)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for r in rows:
        cells = [str(r["model"]), str(r["size"]), str(r["batch"])]
        for b in present:
            v = float(r[b])  # type: ignore[arg-type]
            cells.append(f"{v:,.0f}")
            if b != "eager" and "eager" in present:
                cells.append(f"{v / float(r['eager']):.2f}")  # type: ignore[arg-type]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short run: 3 repeats of ~0.3 s")
    p.add_argument("--size224", action="store_true", help="also the 224 px variants (slow on a CPU)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="intra-op threads for torch and ONNX Runtime (default: torch's)")
    p.add_argument("--models", nargs="+", choices=sorted({c.arch for c in CONFIGS}), help="default: all")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--providers", nargs="+", default=[], help="ONNX Runtime providers, best first")
    p.add_argument("--torch-device", default="cpu", help="device of the eager and TorchScript runs (cpu, cuda)")
    p.add_argument("--json", type=Path, help="also write the rows, the providers and the versions here")
    args = p.parse_args(argv)
    seconds, repeats = (1.0, 3) if args.quick else (5.0, 5)  # per backend and batch size
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads; "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}; {'quick' if args.quick else 'full'} run",
          flush=True)
    rows = []
    for cfg in CONFIGS + (CONFIGS_224 if args.size224 else []):
        if args.models is None or cfg.arch in args.models:
            rows += measure(cfg, args.batches, seconds, repeats, args.threads, tuple(args.backends),
                            tuple(args.providers), args.torch_device)
    obtained = sorted({str(r["provider"]) for r in rows})
    print(f"ONNX Runtime provider: {', '.join(obtained)}")
    print(table(rows))
    if args.json:
        write_json(args.json, {"rows": rows, "providers_asked": args.providers, "providers_obtained": obtained,
                               "torch_device": args.torch_device, "threads": args.threads, "quick": args.quick,
                               "torch": torch.__version__, "onnxruntime": ort.__version__})
    return 0


if __name__ == "__main__":
    sys.exit(main())

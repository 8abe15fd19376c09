"""Training throughput: `zoo train`'s engine against a plain torchvision DataLoader + PIL loop.

Both train the same model on the same data (a synthetic DermaMNIST-shaped file, 28 px RGB)
with the same recipe — optimiser, batch size, the report-001 augmentations (flips, rotation,
colour jitter, each with p 0.1) — and both run a validation pass per epoch. The baseline is what
the reports did: ``medmnist.DermaMNIST(transform=...)`` → ``DataLoader`` → a PIL image and
per-sample torchvision transforms for every sample of every epoch.

Each model runs ``--rounds`` rounds of (engine, baseline, engine with ``precision: bf16`` where the
CPU has native bf16) back to back; the figures are medians, the ratios medians of the per-round
ratios. The engine's default precision on a CPU is fp32, the baseline's arithmetic.

    python bench/bench_train.py [--models lenet simplecnn mlp] [--epochs 2] [--rounds 3] [--threads 1]

``--dataset pathmnist`` uses PathMNIST's shapes and split sizes (``--sizes`` others); ``--precisions fp32
bf16`` runs the engine in exactly those (on a GPU ``auto`` is already bf16); ``--no-baseline`` skips the
DataLoader + PIL loop (the engine is then warmed up on a small set); ``--json`` writes the figures. On a
GPU the baseline trains there too, as the engine does.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import medmnist
import torch
import torchvision.transforms as T
from torch import nn
from torch.utils.data import DataLoader

from zoo.data.synthetic import write_synthetic_medmnist
from zoo.io import write_json
from zoo.models import create_model
from zoo.recipe import Recipe
from zoo.train import train
from zoo.train.precision import native_bf16


def recipe_for(arch: str, epochs: int, batch: int, precision: str = "auto", dataset: str = "derma") -> Recipe:
    return Recipe.model_validate({
        "name": f"bench-{arch}", "dataset": dataset, "arch": arch, "report": "bench", "citation": "bench",
        "train": {"epochs": epochs, "batch_size": batch, "precision": precision, "early_stopping": {"patience": None}},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "augment": {"hflip_p": 0.1, "vflip_p": 0.1, "rotation_deg": 30, "rotation_p": 0.1, "jitter_p": 0.1},
    })


def ours(arch: str, root: Path, store: Path, epochs: int, batch: int, precision: str,
         dataset: str = "derma") -> float:
    """samples/s of the engine (train epochs + validation passes, as timed by the engine)."""
    result = train(recipe_for(arch, epochs, batch, precision, dataset), data_root=root, store=store,
                   progress=False, download=False)
    n = result.card.dataset.sizes["train"]
    return n * epochs / result.card.training.time_s


def naive(arch: str, root: Path, epochs: int, batch: int, flag: str = "dermamnist") -> float:
    """samples/s of the classic per-sample PIL pipeline, same model / optimiser / augmentation, on the
    device the engine picks (the GPU when there is one)."""
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mean, std = (0.5,) * 3, (0.25,) * 3
    aug = T.Compose([
        T.RandomApply([T.RandomHorizontalFlip(1.0)], p=0.1),
        T.RandomApply([T.RandomVerticalFlip(1.0)], p=0.1),
        T.RandomApply([T.RandomRotation(30)], p=0.1),
        T.RandomApply([T.ColorJitter(0.2, 0.2, 0.2)], p=0.1),
        T.ToTensor(), T.Normalize(mean, std),
    ])
    plain = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    def label(y: Any) -> int:
        return int(y[0])

    cls = getattr(medmnist, medmnist.INFO[flag]["python_class"])
    tr = cls(split="train", root=str(root), transform=aug, target_transform=label)
    va = cls(split="val", root=str(root), transform=plain, target_transform=label)
    model = create_model(arch, len(medmnist.INFO[flag]["label"]), 3, 28).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in DataLoader(tr, batch_size=batch, shuffle=True):
            loss = nn.functional.cross_entropy(model(x.to(dev)), y.to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for x, _ in DataLoader(va, batch_size=512):
                model(x.to(dev)).cpu()  # .cpu(): wait for the GPU before the clock stops
    return len(tr) * epochs / (time.perf_counter() - t0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "lenet", "simplecnn"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per model; medians are printed")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for both paths")
    ap.add_argument("--dataset", default="dermamnist", choices=["dermamnist", "pathmnist"],
                    help="MedMNIST flag whose shapes (28 px RGB) and split sizes the synthetic file takes")
    ap.add_argument("--sizes", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                    help="other split sizes (needs --no-baseline: medmnist checks the real ones)")
    ap.add_argument("--precisions", nargs="+", choices=["auto", "fp32", "bf16"],
                    help="engine precisions (default: auto, and bf16 where this CPU has it natively)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the DataLoader + PIL loop")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.sizes and not args.no_baseline:
        ap.error("--sizes needs --no-baseline (medmnist's datasets check the real split sizes)")
    return args


def model_round(arch: str, root: Path, store: Path, args: argparse.Namespace,
                precisions: list[str]) -> dict[str, float]:
    """One round for one model: the engine in each precision and the baseline, back to back."""
    out = {p: ours(arch, root, store, args.epochs, args.batch, p, args.dataset) for p in precisions[:1]}
    if not args.no_baseline:
        out["baseline"] = naive(arch, root, args.epochs, args.batch, args.dataset)
    out.update({p: ours(arch, root, store, args.epochs, args.batch, p, args.dataset) for p in precisions[1:]})
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = native_bf16(dev)
    precisions = args.precisions or ["auto", *(["bf16"] if bf16 else [])]
    with tempfile.TemporaryDirectory() as tmp:
        root, store = Path(tmp) / "data", Path(tmp) / "store"
        # the real split sizes by default: medmnist's Dataset.__len__ asserts them
        sizes = tuple(args.sizes or (medmnist.INFO[args.dataset]["n_samples"][s] for s in ("train", "val", "test")))
        write_synthetic_medmnist(root, args.dataset, 28, sizes)
        if args.no_baseline:  # a small set warms the engine up (CUDA context, cuDNN, allocator)
            write_synthetic_medmnist(Path(tmp) / "warm", args.dataset, 28, (4 * args.batch, args.batch, args.batch))
        print(f"torch {torch.__version__} on {dev}, {torch.get_num_threads()} threads; {sizes[0]} images 28 px RGB "
              f"({args.dataset}), batch {args.batch}, {args.epochs} epochs, report-001 augmentation")
        if args.precisions is None:
            print(f"{'model':12s} {'zoo train':>12s} {'DataLoader+PIL':>15s} {'ratio':>6s}"
                  + (f" {'zoo train bf16':>15s} {'ratio':>6s}" if bf16 else "  (no native bf16 on this CPU)"))
        results = {}
        for arch in args.models:
            if args.no_baseline:
                ours(arch, Path(tmp) / "warm", store, 1, args.batch, precisions[0], args.dataset)
            else:
                naive(arch, root, 1, args.batch, args.dataset)  # warm-up (allocator, kernels) for both paths
            # per round, back to back, so that each ratio compares runs under the same load
            rounds = [model_round(arch, root, store, args, precisions) for _ in range(args.rounds)]
            results[arch] = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
            print_row(arch, rounds, args.precisions is None and not args.no_baseline, bf16)
    if args.json:
        write_json(args.json, {"torch": torch.__version__, "device": str(dev), "dataset": args.dataset,
                               "sizes": list(sizes), "batch": args.batch, "epochs": args.epochs,
                               "rounds": args.rounds, "samples_per_s": results})


def print_row(arch: str, rounds: list[dict[str, float]], classic: bool, bf16: bool) -> None:
    """The classic row (engine, baseline, ratio, engine bf16, ratio: medians, ratios per round), or
    each figure's median."""
    if not classic:
        print(f"{arch:12s} " + "  ".join(f"{k} {statistics.median(r[k] for r in rounds):.0f} /s" for k in rounds[0]))
        return
    rows = [(r["auto"], r["baseline"], r["auto"] / r["baseline"], r.get("bf16", math.nan),
             r.get("bf16", math.nan) / r["baseline"]) for r in rounds]
    a, b, r, h, rh = (statistics.median(col) for col in zip(*rows, strict=True))
    print(f"{arch:12s} {a:9.0f} /s {b:12.0f} /s {r:5.1f}x" + (f" {h:12.0f} /s {rh:5.1f}x" if bf16 else ""))


if __name__ == "__main__":
    main()

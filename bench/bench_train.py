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
from zoo.models import create_model
from zoo.recipe import Recipe
from zoo.train import train
from zoo.train.precision import native_bf16


def recipe_for(arch: str, epochs: int, batch: int, precision: str = "auto") -> Recipe:
    return Recipe.model_validate({
        "name": f"bench-{arch}", "dataset": "derma", "arch": arch, "report": "bench", "citation": "bench",
        "train": {"epochs": epochs, "batch_size": batch, "precision": precision, "early_stopping": {"patience": None}},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "augment": {"hflip_p": 0.1, "vflip_p": 0.1, "rotation_deg": 30, "rotation_p": 0.1, "jitter_p": 0.1},
    })


def ours(arch: str, root: Path, store: Path, epochs: int, batch: int, precision: str) -> float:
    """samples/s of the engine (train epochs + validation passes, as timed by the engine)."""
    result = train(recipe_for(arch, epochs, batch, precision), data_root=root, store=store, progress=False,
                   download=False)
    n = result.card.dataset.sizes["train"]
    return n * epochs / result.card.training.time_s


def naive(arch: str, root: Path, epochs: int, batch: int) -> float:
    """samples/s of the classic per-sample PIL pipeline, same model / optimiser / augmentation."""
    torch.manual_seed(0)
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

    tr = medmnist.DermaMNIST(split="train", root=str(root), transform=aug, target_transform=label)
    va = medmnist.DermaMNIST(split="val", root=str(root), transform=plain, target_transform=label)
    model = create_model(arch, 7, 3, 28)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in DataLoader(tr, batch_size=batch, shuffle=True):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for x, _ in DataLoader(va, batch_size=512):
                model(x)
    return len(tr) * epochs / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "lenet", "simplecnn"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per model; medians are printed")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for both paths")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root, store = Path(tmp) / "data", Path(tmp) / "store"
        # DermaMNIST's real split sizes: medmnist's Dataset.__len__ asserts them
        sizes = tuple(medmnist.INFO["dermamnist"]["n_samples"][s] for s in ("train", "val", "test"))
        write_synthetic_medmnist(root, "dermamnist", 28, sizes)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {sizes[0]} images 28 px RGB, "
              f"batch {args.batch}, {args.epochs} epochs, report-001 augmentation")
        bf16 = native_bf16(torch.device("cpu"))
        print(f"{'model':12s} {'zoo train':>12s} {'DataLoader+PIL':>15s} {'ratio':>6s}"
              + (f" {'zoo train bf16':>15s} {'ratio':>6s}" if bf16 else "  (no native bf16 on this CPU)"))
        for arch in args.models:
            naive(arch, root, 1, args.batch)  # warm-up (allocator, kernels) for both paths
            rows = []  # per round, back to back, so that each ratio compares runs under the same load
            for _ in range(args.rounds):
                a = ours(arch, root, store, args.epochs, args.batch, "auto")
                b = naive(arch, root, args.epochs, args.batch)
                h = ours(arch, root, store, args.epochs, args.batch, "bf16") if bf16 else math.nan
                rows.append((a, b, a / b, h, h / b))
            a, b, r, h, rh = (statistics.median(col) for col in zip(*rows, strict=True))
            print(f"{arch:12s} {a:9.0f} /s {b:12.0f} /s {r:5.1f}x" + (f" {h:12.0f} /s {rh:5.1f}x" if bf16 else ""))

if __name__ == "__main__":
    main()

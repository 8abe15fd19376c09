"""Robustness to acquisition artefacts (MedMNIST-C) on the real BreastMNIST, with and without its augmentation.

For each architecture, seed and training (the recipe as it is, or with ``augment.medmnistc: true``,
MedMNIST-C's ``AugMedMNISTC``): ``zoo train`` on BreastMNIST, then ``zoo eval --corruptions`` on the
test split (MedMNIST-C's 7 BreastMNIST corruptions × 5 severities, applied at 224 px and resized back
to 28 px, seeded; the corrupted images are made once and shared by every bundle). Reported: the
clean test ACC / AUC / balanced error, and MedMNIST-C's BE and rBE against its AlexNet baseline
(mean over the 7 corruptions), each as mean ± sd over the seeds, then rBE per corruption.

    python bench/bench_robustness.py --archs simplecnn resnet18 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "medmnist"
EPOCHS = {"simplecnn": 6, "resnet18": 4}  # short schedules: 12 runs in ~15 min of a 2-core CPU


def train_one(arch: str, seed: int, augment: bool, store: Path) -> Path:
    from zoo.recipe import apply_overrides, find_recipe
    from zoo.train import train

    overrides: dict[str, Any] = {"epochs": EPOCHS.get(arch, 6), "batch_size": 32, "train.seed": seed}
    if augment:
        overrides["augment.medmnistc"] = True
    recipe = apply_overrides(find_recipe("breast", arch), overrides)
    return train(recipe, data_root=DATA, store=store, download=False, progress=False).bundle


def measure(bundle: Path) -> dict[str, Any]:
    from zoo.card import read_card
    from zoo.evaluate import robustness_bundle

    info = robustness_bundle(bundle, data_root=DATA, download=False)
    test = read_card(bundle).metrics.test
    return {"acc": test.acc, "auc": test.auc, "clean_be": info.clean["balanced_error"], "be": info.summary["be"],
            "rbe": info.summary["rbe"], "rbe_per": dict(info.rbe), "threshold": info.threshold}


def _ms(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def report(results: dict[tuple[str, bool], list[dict[str, Any]]]) -> None:
    print("\n| arch | training | test ACC | test AUC | clean balanced error | BE | rBE |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (arch, aug), runs in results.items():
        cells = [_ms([r[k] for r in runs]) for k in ("acc", "auc", "clean_be", "be", "rbe")]
        print(f"| {arch} | {'+ MedMNIST-C aug' if aug else 'recipe'} | " + " | ".join(cells) + " |")
    names = list(next(iter(results.values()))[0]["rbe_per"])
    print("\nrBE per corruption (mean over seeds):\n")
    print("| arch | training | " + " | ".join(names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for (arch, aug), runs in results.items():
        cells = [f"{np.mean([r['rbe_per'][n] for r in runs]):.2f}" for n in names]
        print(f"| {arch} | {'+ aug' if aug else 'recipe'} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["simplecnn", "resnet18"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args()
    print(f"# bench_robustness: {platform.processor() or platform.machine()}, real BreastMNIST (official splits), "
          f"epochs {EPOCHS}, batch 32")
    start = time.perf_counter()
    results: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            for aug in (False, True):
                for seed in args.seeds:
                    t0 = time.perf_counter()
                    r = measure(train_one(arch, seed, aug, Path(tmp)))
                    results.setdefault((arch, aug), []).append(r)
                    print(f"{arch} aug={aug} seed {seed}: ACC {r['acc']:.3f} AUC {r['auc']:.3f} clean BE "
                          f"{r['clean_be']:.3f} BE {r['be']:.3f} rBE {r['rbe']:.3f} (threshold "
                          f"{r['threshold']:.3f}; {time.perf_counter() - t0:.0f} s)", flush=True)
    report(results)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

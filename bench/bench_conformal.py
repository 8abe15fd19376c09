"""Prediction sets and the choice of calibration on the real BreastMNIST, over seeds.

For each architecture and seed: ``zoo train`` on BreastMNIST (which chooses the calibration among
none / temperature / Dirichlet by cross-validated validation NLL and fits the conformal sets on the
validation split), then on the test split (evaluated once, choosing nothing):

* every calibration candidate, refitted on the whole validation split: test ECE and NLL, and which
  one the card chose;
* the card's prediction sets at α = 0.05, 0.1, 0.2: coverage (overall and per class) and mean set size.

    python bench/bench_conformal.py --archs simplecnn resnet18 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "medmnist"
EPOCHS = {"simplecnn": 8, "resnet18": 5}
ALPHAS = (0.05, 0.1, 0.2)


def train_one(arch: str, seed: int, store: Path) -> Path:
    from zoo.recipe import apply_overrides, find_recipe
    from zoo.train import train

    recipe = apply_overrides(find_recipe("breast", arch), {"epochs": EPOCHS.get(arch, 8), "batch_size": 32,
                                                           "train.seed": seed})
    return train(recipe, data_root=DATA, store=store, download=False, progress=False).bundle


def measure(bundle: Path) -> dict[str, object]:
    """The candidates' test ECE / NLL and the sets' test coverage and size at each α."""
    import torch

    from zoo.bundle import load_bundle
    from zoo.card import read_card
    from zoo.inference import bundle_splits, predict_logits
    from zoo.postprocess import calibrated_probs, prediction_sets
    from zoo.trust.calibration import KINDS, calibration_metrics, fit_kind
    from zoo.trust.conformal import set_metrics

    card = read_card(bundle)
    splits = bundle_splits(card, DATA)
    net = load_bundle(bundle).model
    with torch.no_grad():
        val, test = (predict_logits(net, s.images).double().numpy() for s in (splits.val, splits.test))
    vy, ty = splits.val.labels.numpy(), splits.test.labels.numpy()
    cands = {}
    for kind in KINDS:
        cal = fit_kind(kind, val, vy, card.num_classes)
        m = calibration_metrics(calibrated_probs(test, cal), ty)
        cands[kind] = (m["ece"], m["nll"], card.calibration.candidates.get(kind, float("nan")))
    probs = calibrated_probs(test, card.calibration)
    sets = {a: set_metrics(prediction_sets(probs, card.conformal, a), ty) for a in ALPHAS}
    return {"chosen": card.calibration.kind, "candidates": cands, "sets": sets, "score": card.conformal.score,
            "mondrian": card.conformal.mondrian, "auc": card.metrics.test.auc}


def summarise(arch: str, runs: list[dict]) -> None:
    print(f"\n## {arch}: {len(runs)} seeds, {EPOCHS.get(arch, 8)} epochs each; test AUC "
          + ", ".join(f"{r['auc']:.3f}" for r in runs))
    print("calibration chosen per seed: " + ", ".join(str(r["chosen"]) for r in runs)
          + "; conformal score per seed: " + ", ".join(f"{r['score']}{' (Mondrian)' if r['mondrian'] else ''}"
                                                       for r in runs))
    print("| candidate | cv val NLL (mean) | test ECE (mean) | test NLL (mean) | chosen in |")
    print("|---|---:|---:|---:|---:|")
    for kind in runs[0]["candidates"]:
        ece, nll, cv = (np.mean([r["candidates"][kind][i] for r in runs]) for i in range(3))
        print(f"| {kind} | {cv:.4f} | {ece:.4f} | {nll:.4f} | {sum(r['chosen'] == kind for r in runs)}/{len(runs)} |")
    print("| α | coverage per seed | mean coverage | coverage class 0 / 1 (mean) | mean set size (mean) |")
    print("|---|---|---:|---:|---:|")
    for a in ALPHAS:
        cov = [r["sets"][a]["coverage"] for r in runs]
        per = [np.mean([r["sets"][a].get(f"coverage_{k}", np.nan) for r in runs]) for k in (0, 1)]
        size = np.mean([r["sets"][a]["mean_set_size"] for r in runs])
        print(f"| {a} | {', '.join(f'{c:.3f}' for c in cov)} | {np.mean(cov):.3f} | {per[0]:.3f} / {per[1]:.3f} | "
              f"{size:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["simplecnn", "resnet18"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args()
    print(f"# bench_conformal: {platform.processor() or platform.machine()}, real BreastMNIST (official splits: "
          "546 train, 78 validation, 156 test)")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            summarise(arch, [measure(train_one(arch, s, Path(tmp))) for s in args.seeds])


if __name__ == "__main__":
    main()

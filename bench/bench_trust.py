"""Calibration and the out-of-distribution flag on the real BreastMNIST.

For each architecture: ``zoo train`` on BreastMNIST (which fits the temperature and the detector on
the validation split), ``zoo export``, then, through the exported ONNX file (what is served):

* calibration: test ECE, Brier and NLL before and after temperature scaling;
* out-of-distribution: AUROC of the score between BreastMNIST test images and each set of images
  that are not breast ultrasound — scikit-image's and scikit-learn's photographs (whole and
  cropped), LFW faces, sklearn's digits, and shifts of the test images (noise, blank, inverted,
  rotated) — and, at the fitted threshold, the fraction of each set accepted as in-distribution
  (the false-positive rate) and of the BreastMNIST test images flagged;
* the same AUROC for the usual logit-based scores measured in the same run (maximum softmax
  probability, energy, max-logit), the baselines the detector was chosen against.

    python bench/bench_trust.py --archs simplecnn resnet18 mlp
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import numpy as np
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "medmnist"
EPOCHS = {"simplecnn": 8, "resnet18": 5, "mlp": 10, "lenet": 8}


def ood_sets(test: np.ndarray) -> dict[str, np.ndarray]:
    from zoo.data.shifted import SHIFTS, digits, faces, natural_photographs, shifted

    sets = {"photographs (skimage, sklearn)": natural_photographs(28, 1), "LFW faces": faces(28, 1),
            "sklearn digits": digits(28, 1)}
    sets.update({kind: shifted(test, kind) for kind in SHIFTS})
    return sets


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    return float(roc_auc_score(y, np.r_[id_scores, ood_scores]))


def baselines(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Logit-based OOD scores (higher = more out of distribution)."""
    from zoo.postprocess import to_probs

    return {"MSP": -to_probs(logits).max(axis=1), "energy": -logsumexp(logits, axis=1),
            "max-logit": -logits.max(axis=1)}


def train_and_export(arch: str, store: Path) -> Path:
    from export import export_bundle
    from zoo.recipe import apply_overrides, find_recipe
    from zoo.train import train

    recipe = apply_overrides(find_recipe("breast", arch), {"epochs": EPOCHS.get(arch, 8), "batch_size": 32})
    bundle = train(recipe, data_root=DATA, store=store, download=False, progress=False).bundle
    export_bundle(bundle, formats=["onnx"], data_root=DATA)
    return bundle


def report(arch: str, bundle: Path) -> None:
    from zoo.card import read_card
    from zoo.inference import bundle_splits
    from zoo.runtime import OnnxModel
    from zoo.settings import runtime_options

    card = read_card(bundle)
    model = OnnxModel.open(bundle, runtime_options())
    test = bundle_splits(card, DATA).test.images.numpy()
    out = model.outputs(test)
    cal = card.calibration.metrics["test"]
    print(f"\n## {arch} ({card.training.epochs_run} epochs, test AUC {card.metrics.test.auc:.3f}, "
          f"temperature {card.calibration.temperature:.3f})")
    print(f"test ECE {cal['before']['ece']:.4f} -> {cal['after']['ece']:.4f}, Brier {cal['before']['brier']:.4f} -> "
          f"{cal['after']['brier']:.4f}, NLL {cal['before']['nll']:.4f} -> {cal['after']['nll']:.4f}")
    thr = card.ood.threshold
    print(f"BreastMNIST test flagged at the fitted threshold: {(out['ood_score'] > thr).mean():.1%} "
          f"(validation {card.ood.rates['val_flagged']:.1%})")
    base_id = baselines(out["logits"])
    print("| OOD set | n | AUROC | accepted at threshold (FPR) | MSP AUROC | energy AUROC | max-logit AUROC |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, images in ood_sets(test).items():
        o = model.outputs(images)
        base = baselines(o["logits"])
        print(f"| {name} | {len(images)} | {auroc(out['ood_score'], o['ood_score']):.3f} | "
              f"{(o['ood_score'] <= thr).mean():.1%} | "
              + " | ".join(f"{auroc(base_id[k], base[k]):.3f}" for k in ("MSP", "energy", "max-logit")) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["simplecnn", "resnet18", "mlp"])
    args = ap.parse_args()
    print(f"# bench_trust: {platform.processor() or platform.machine()}, real BreastMNIST (official splits)")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            report(arch, train_and_export(arch, Path(tmp)))


if __name__ == "__main__":
    main()

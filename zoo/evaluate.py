"""``zoo eval``: metrics of a bundle on one split of the data it was trained on.

Probabilities are the calibrated ones (as served and scored); with a calibration, ECE / Brier / NLL
before and after are shown, and with a detector the fraction of the split flagged out of distribution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo.bundle import Bundle, load_bundle
from zoo.errors import UsageError
from zoo.inference import bundle_splits, pick_device, predict_logits
from zoo.metrics import compute_metrics
from zoo.postprocess import interpret, to_probs
from zoo.trust.calibration import calibration_metrics

SPLITS = ("train", "val", "test")


def evaluate_bundle(
    path: str | Path, split: str = "test", data_root: str | Path | None = None,
    device: str | None = None, download: bool = True,
) -> dict[str, Any]:
    """Metrics plus per-image predictions (``pred``, ``probs``) for one split."""
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    dev = pick_device(device)
    bundle = load_bundle(path, dev)
    ds = getattr(bundle_splits(bundle.card, data_root, download), split)
    labels = ds.labels.numpy()
    logits, ood = _outputs(bundle, ds.images, dev)
    answer = interpret(logits, bundle.card, ood)  # calibrated probabilities, as served and scored
    metrics = compute_metrics(labels, answer.probs, bundle.labels)
    if bundle.card.calibration is not None:
        metrics["calibration"] = {"temperature": bundle.card.calibration.temperature,
                                  "before": calibration_metrics(to_probs(logits), labels),
                                  "after": calibration_metrics(answer.probs, labels)}
    if answer.in_distribution is not None:
        metrics["ood_flagged"] = float((~answer.in_distribution).mean())
    return {"bundle": bundle.id, "split": split, "metrics": metrics, "pred": answer.classes, "probs": answer.probs,
            "labels": labels, "calibrated": answer.calibrated, "ood_score": answer.ood_score}


def _outputs(bundle: Bundle, images: torch.Tensor, dev: torch.device) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits, and the out-of-distribution scores when the bundle has a detector."""
    if bundle.scored is None:
        return predict_logits(bundle.model, images, device=dev).numpy(), None
    logits, ood = [], []
    with torch.no_grad():
        for i in range(0, len(images), 128):
            lg, sc = bundle.scored(images[i : i + 128].to(dev))
            logits.append(lg.float().cpu())
            ood.append(sc.float().cpu())
    return torch.cat(logits).numpy(), torch.cat(ood).numpy()


def format_metrics(m: dict[str, Any]) -> str:
    recall = ", ".join(f"{k[:20]} {v:.3f}" for k, v in m["per_class_recall"].items())
    text = (
        f"n={m['n']}  ACC {m['acc']:.4f}  macro-F1 {m['macro_f1']:.4f}  AUC {m['auc']:.4f}\n"
        f"per-class recall: {recall}\nconfusion:\n"
        + "\n".join("  " + " ".join(f"{v:5d}" for v in row) for row in m["confusion"])
    )
    cal = m.get("calibration")
    if cal:
        b, a = cal["before"], cal["after"]
        text += (f"\ncalibration (temperature {cal['temperature']:.3f}): ECE {b['ece']:.4f} -> {a['ece']:.4f}, "
                 f"Brier {b['brier']:.4f} -> {a['brier']:.4f}, NLL {b['nll']:.4f} -> {a['nll']:.4f}")
    if "ood_flagged" in m:
        text += f"\nflagged out of distribution: {m['ood_flagged']:.1%}"
    return text


__all__ = ["SPLITS", "evaluate_bundle", "format_metrics"]

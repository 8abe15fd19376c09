"""``zoo eval``: metrics of a bundle on one split of the data it was trained on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo.bundle import load_bundle
from zoo.inference import bundle_splits, pick_device, predict_logits
from zoo.metrics import compute_metrics
from zoo.postprocess import to_probs

SPLITS = ("train", "val", "test")


def evaluate_bundle(
    path: str | Path, split: str = "test", data_root: str | Path | None = None,
    device: str | None = None, download: bool = True,
) -> dict[str, Any]:
    """Metrics plus per-image predictions (``pred``, ``probs``) for one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    dev = pick_device(device)
    bundle = load_bundle(path, dev)
    ds = getattr(bundle_splits(bundle.card, data_root, download), split)
    logits = predict_logits(bundle.model, ds.images, device=dev).numpy()
    probs = to_probs(logits)
    metrics = compute_metrics(ds.labels.numpy(), probs, bundle.labels)
    return {"bundle": bundle.id, "split": split, "metrics": metrics,
            "pred": probs.argmax(1), "probs": probs, "labels": ds.labels.numpy()}


def format_metrics(m: dict[str, Any]) -> str:
    recall = ", ".join(f"{k[:20]} {v:.3f}" for k, v in m["per_class_recall"].items())
    return (
        f"n={m['n']}  ACC {m['acc']:.4f}  macro-F1 {m['macro_f1']:.4f}  AUC {m['auc']:.4f}\n"
        f"per-class recall: {recall}\nconfusion:\n"
        + "\n".join("  " + " ".join(f"{v:5d}" for v in row) for row in m["confusion"])
    )


__all__ = ["SPLITS", "evaluate_bundle", "format_metrics"]

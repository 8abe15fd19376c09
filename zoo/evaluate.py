"""``zoo eval``: metrics of a bundle on one split of the data it was trained on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo.bundle import Bundle, load_bundle
from zoo.metrics import compute_metrics, to_probs
from zoo.recipe import Recipe
from zoo.train.engine import load_splits, pick_device, predict_logits


def bundle_splits(bundle: Bundle, data_root: str | Path | None, download: bool = True):
    """The splits a bundle was trained on, rebuilt from its resolved recipe; checksum verified."""
    recipe = Recipe.model_validate(bundle.card["recipe"])
    splits = load_splits(recipe, data_root, download)
    expected = bundle.card["dataset"]["checksum"]
    if splits.checksum != expected:
        raise ValueError(
            f"the data found ({splits.source}, sha256 {splits.checksum[:12]}…) is not the data "
            f"{bundle.id} was trained on (sha256 {expected[:12]}…)"
        )
    return splits


def evaluate_bundle(
    path: str | Path, split: str = "test", data_root: str | Path | None = None,
    device: str | None = None, download: bool = True,
) -> dict[str, Any]:
    """Metrics plus per-image predictions (``pred``, ``probs``) for one split."""
    if split not in ("train", "val", "test"):
        raise ValueError("split must be train, val or test")
    dev = pick_device(device)
    bundle = load_bundle(path, dev)
    ds = getattr(bundle_splits(bundle, data_root, download), split)
    logits = predict_logits(bundle.model, ds.images, device=dev)
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


__all__ = ["bundle_splits", "evaluate_bundle", "format_metrics"]

"""Fitting calibration and the out-of-distribution detector for a bundle, recorded in its card.

``fit_bundle(path, splits)``: one pass over the validation and test splits (and a subset of the
train split for the detector's statistics) with the bundle's own weights; the calibration (chosen
among none / temperature / Dirichlet by cross-validated NLL), the conformal prediction sets and, for
a binary task, the decision threshold from validation only; ECE / Brier / NLL before and after, and
the sets' coverage, on validation and on test (reported, never choosing); the validation logits
written to ``validation.safetensors`` (an ensemble of bundles fits its own sets from them); the
detector's statistics written to ``ood.safetensors`` (sha256s in the card); ``reliability.png``;
the card's ``calibration``, ``conformal`` and ``ood`` sections, and ``drift`` (the validation split's
predicted-class shares and OOD scores under the served rule: what the service's drift tests compare
with); the Markdown card rewritten.
Exports made before must be made again (their metadata and graph carry these): the ``zoo calibrate``
command does that.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from zoo.bundle import load_bundle
from zoo.card import CalibrationInfo, ConformalInfo, DriftReference, ModelInfo, OODInfo, update_card
from zoo.data import DataSplits
from zoo.inference import bundle_splits
from zoo.io import atomic_file, sha256_of
from zoo.modelcard import write_model_card
from zoo.postprocess import calibrated_probs, interpret
from zoo.trust.calibration import calibration_metrics, choose_calibration, decision_threshold, reliability_diagram
from zoo.trust.conformal import evaluate_sets, fit_conformal, save_validation
from zoo.trust.ood import (
    MAX_FIT_IMAGES,
    METHOD,
    TARGET_TPR,
    LayerStats,
    collect,
    feature_layers,
    fit_detector,
    score,
    stats_to_tensors,
)

log = logging.getLogger(__name__)
RELIABILITY = "reliability.png"


def _train_subset(images: torch.Tensor, limit: int = MAX_FIT_IMAGES, seed: int = 0) -> torch.Tensor:
    if len(images) <= limit:
        return images
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:limit]
    return images[idx.sort().values]


def fit_calibration(val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                    num_classes: int) -> tuple[CalibrationInfo, ConformalInfo, dict[str, Any]]:
    """Calibration and conformal sets (validation), the binary threshold, and metrics on both splits."""
    (val_logits, val_y), (test_logits, test_y) = val, test
    info = choose_calibration(val_logits, val_y, num_classes)
    conformal = fit_conformal(calibrated_probs(val_logits, info), val_y, num_classes)
    curves, metrics = {}, {}
    for name, logits, y in (("val", val_logits, val_y), ("test", test_logits, test_y)):
        before, after = calibrated_probs(logits, None), calibrated_probs(logits, info)
        metrics[name] = {"before": calibration_metrics(before, y), "after": calibration_metrics(after, y)}
        curves[f"{name} uncalibrated"], curves[f"{name} calibrated"] = (before, y), (after, y)
        conformal.metrics[name] = evaluate_sets(conformal, after, y)
    if num_classes == 2:
        info.threshold = decision_threshold(calibrated_probs(val_logits, info), val_y)
    info.metrics = metrics
    return info, conformal, curves


def fit_ood(feats: dict[str, list[np.ndarray]], layers: list[str]) -> tuple[OODInfo, list[LayerStats]]:
    """The detector on the train split's features, standardised and thresholded on validation."""
    stats, threshold = fit_detector(feats["train"], feats["val"])
    rates = {f"{split}_flagged": float((score(stats, feats[split]) > threshold).mean()) for split in ("val", "test")}
    info = OODInfo(method=METHOD.format(n=len(layers)), layers=layers, threshold=threshold, target_tpr=TARGET_TPR,
                   rates=rates)
    return info, stats


def drift_reference(info: ModelInfo, val_logits: np.ndarray, val_ood: np.ndarray | None) -> DriftReference:
    """The validation split as the service would have answered it (``info`` carries the fitted
    calibration and detector): the reference of the service's drift tests (:mod:`serving.drift`)."""
    answer = interpret(val_logits, info, val_ood)
    shares = np.bincount(answer.classes, minlength=info.num_classes) / len(answer)
    flagged = answer.in_distribution
    return DriftReference(
        images=len(answer), class_proportions=[float(v) for v in shares],
        ood_scores=None if answer.ood_score is None else [float(v) for v in np.sort(answer.ood_score)],
        ood_rate=None if flagged is None else float((~flagged).mean()))


def fit_bundle(path: str | Path, splits: DataSplits | None = None, data_root: str | Path | None = None,
               ood: bool = True, device: str | torch.device = "cpu",
               max_train_images: int = MAX_FIT_IMAGES) -> dict[str, Any]:
    """Fit and record calibration (and the OOD detector) for a bundle; returns the new card sections.
    ``max_train_images``: the train images the detector's Gaussians are fitted on (a random subset)."""
    bundle = load_bundle(path, device)
    splits = splits if splits is not None else bundle_splits(bundle.card, data_root, download=False)
    layers = feature_layers(bundle.net) if ood else []
    passes = {"val": splits.val, "test": splits.test}
    logits, feats = {}, {}
    for name, ds in passes.items():
        logits[name], feats[name] = collect(bundle.model, bundle.net, layers, ds.images, device=device)
    labels = {name: ds.labels.numpy() for name, ds in passes.items()}
    calibration, conformal, curves = fit_calibration((logits["val"], labels["val"]),
                                                     (logits["test"], labels["test"]), bundle.card.num_classes)
    reliability_diagram(bundle.path / RELIABILITY, curves, f"{bundle.id}: reliability")
    conformal.validation_sha256 = save_validation(bundle.path, logits["val"], labels["val"])
    fields: dict[str, Any] = {"calibration": calibration, "conformal": conformal}
    val_ood: np.ndarray | None = None
    if ood:
        train = _train_subset(splits.train.images, max_train_images)
        _, feats["train"] = collect(bundle.model, bundle.net, layers, train, device=device)
        info, stats = fit_ood(feats, layers)
        stats_path = bundle.path / info.stats_file
        atomic_file(stats_path, lambda tmp: save_file(stats_to_tensors(stats), str(tmp)))
        info.stats_sha256 = sha256_of(stats_path)
        fields["ood"] = info
        val_ood = score(stats, feats["val"])
    fitted = bundle.card.model_copy(update=fields)  # the card as it is about to be written
    fields["drift"] = drift_reference(fitted, logits["val"], val_ood)
    card = update_card(bundle.path, **fields)
    write_model_card(bundle.path)
    return {"calibration": card.calibration, "conformal": card.conformal, "ood": card.ood, "drift": card.drift}


__all__ = ["RELIABILITY", "drift_reference", "fit_bundle", "fit_calibration", "fit_ood"]

"""Split conformal prediction sets, fitted on the validation split's calibrated probabilities.

A prediction set at level 1 − α holds the true class with probability at least 1 − α over
exchangeable images (Vovk et al. 2005; Angelopoulos and Bates 2021), whatever the model: the
guarantee is finite-sample and marginal, or per class with a Mondrian (class-conditional)
conformal predictor. The p-values are crepes' (Boström 2024), non-smoothed so that an answer does
not change between two calls; the card keeps the validation conformity scores so that any α can be
asked for later, and :func:`zoo.postprocess.prediction_sets` applies them in numpy (the ONNX path
and serving import neither torch nor crepes).

Choices made here, per bundle, on validation only:

* Mondrian when every class has enough validation images to honour α = :data:`ALPHA_MIN` (a class
  with n images can exclude itself only at α ≥ 1 / (n + 1)); marginal otherwise.
* The conformity score with the smallest sets: LAC, APS and RAPS are each calibrated on k − 1
  folds of the validation split and measured on the k-th (the coverage holds for every score by
  construction, so the sets' size decides).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from crepes import ConformalClassifier
from safetensors.numpy import save_file
from sklearn.model_selection import StratifiedKFold

from zoo.card import ConformalInfo
from zoo.io import atomic_file, sha256_of
from zoo.postprocess import conformity_scores, prediction_sets

ALPHA = 0.1  # default level of the answers: 90 % sets
ALPHA_MIN = 0.05  # Mondrian needs every class able to honour 95 % sets
SCORES = ("lac", "aps", "raps")
# RAPS' penalty (Angelopoulos et al., ICLR 2021): a small λ past the first rank; not tuned
RAPS_LAMBDA, RAPS_K = 0.01, 1
FOLDS = 5
_NAMES = {"lac": "LAC (1 − p)", "aps": "APS (cumulative mass)", "raps": f"RAPS (λ = {RAPS_LAMBDA}, k = {RAPS_K})"}


def min_images_per_class(alpha: float) -> int:
    """The fewest calibration images a class needs before its own scores can exclude it at α."""
    return math.ceil((1 - alpha) / alpha)


def true_scores(probs: np.ndarray, labels: np.ndarray, score: str) -> np.ndarray:
    s = conformity_scores(probs, score, RAPS_LAMBDA, RAPS_K)
    return s[np.arange(len(labels)), labels]


def _fitted(probs: np.ndarray, labels: np.ndarray, score: str, mondrian: bool, alpha: float) -> ConformalInfo:
    """A conformal predictor fitted by crepes on labelled probabilities: its calibration scores
    (per class when Mondrian, crepes' bins being the labels, as in ``WrapClassifier(class_cond=True)``)."""
    num_classes = probs.shape[1]
    cc = ConformalClassifier().fit(true_scores(probs, labels, score), bins=labels if mondrian else None)
    if mondrian:
        scores = [np.sort(cc.alphas[cc.bins == k]).tolist() for k in range(num_classes)]
    else:
        scores = [np.sort(cc.alphas).tolist()]
    return ConformalInfo(score=score, raps_lambda=RAPS_LAMBDA, raps_k=RAPS_K, mondrian=mondrian, alpha=alpha,
                         scores=scores)


def set_metrics(sets: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Coverage (true class in the set), mean set size, and coverage per class (``coverage_<k>``)."""
    hit = sets[np.arange(len(labels)), labels]
    out = {"coverage": float(hit.mean()), "mean_set_size": float(sets.sum(axis=1).mean()), "n": float(len(labels))}
    for k in np.unique(labels):
        out[f"coverage_{int(k)}"] = float(hit[labels == k].mean())
    return out


def cross_validated(probs: np.ndarray, labels: np.ndarray, score: str, mondrian: bool,
                    alpha: float) -> dict[str, float]:
    """Coverage and mean set size of ``score``: calibrated on k − 1 folds, measured on the k-th."""
    folds = min(FOLDS, int(np.bincount(labels).min()))
    if folds < 2:
        return {}
    sets = np.zeros(probs.shape, dtype=bool)
    for cal, held in StratifiedKFold(folds, shuffle=True, random_state=0).split(probs, labels):
        sets[held] = prediction_sets(probs[held], _fitted(probs[cal], labels[cal], score, mondrian, alpha), alpha)
    m = set_metrics(sets, labels)
    return {"coverage": m["coverage"], "mean_set_size": m["mean_set_size"]}


def fit_conformal(probs: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = ALPHA) -> ConformalInfo:
    """The conformal predictor of a model from its calibrated validation probabilities."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels).reshape(-1).astype(np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    need = min_images_per_class(ALPHA_MIN)
    mondrian = bool(counts.min() >= need)
    why = (f"class-conditional (Mondrian): every class has at least {need} validation images "
           f"(fewest: {int(counts.min())}), enough for sets down to α = {ALPHA_MIN}" if mondrian else
           f"marginal: class {int(counts.argmin())} has {int(counts.min())} validation images, fewer than the "
           f"{need} a class-conditional set at α = {ALPHA_MIN} needs; coverage holds over all images, not per class")
    candidates = {name: cross_validated(probs, labels, name, mondrian, alpha) for name in SCORES}
    measured = {k: v for k, v in candidates.items() if v}
    # the smallest sets (ties: the simpler score, LAC before APS before RAPS)
    score = min(measured, key=lambda k: (round(measured[k]["mean_set_size"], 6), SCORES.index(k)), default="lac")
    fitted = _fitted(probs, labels, score, mondrian, alpha)
    method = (f"split conformal prediction (crepes), {_NAMES[score]} scores of the calibrated validation "
              f"probabilities, {'class-conditional' if mondrian else 'marginal'}; chosen for the smallest "
              f"cross-validated sets among {', '.join(SCORES)}")
    return fitted.model_copy(update={"method": method, "why": why, "candidates": candidates})


def save_validation(bundle: Path, logits: np.ndarray, labels: np.ndarray) -> str:
    """Write the validation logits and labels beside the card; their sha256."""
    path = bundle / ConformalInfo.model_fields["validation_file"].default
    tensors = {"logits": np.ascontiguousarray(logits, dtype=np.float32),
               "labels": np.ascontiguousarray(np.asarray(labels).reshape(-1), dtype=np.int64)}
    atomic_file(path, lambda tmp: save_file(tensors, str(tmp)))
    return sha256_of(path)


def evaluate_sets(conformal: ConformalInfo, probs: np.ndarray, labels: np.ndarray,
                  alpha: float | None = None) -> dict[str, float]:
    """Coverage and set size of the card's sets on labelled images (e.g. the test split)."""
    return set_metrics(prediction_sets(probs, conformal, alpha), np.asarray(labels).reshape(-1).astype(np.int64))


__all__ = ["ALPHA", "ALPHA_MIN", "SCORES", "cross_validated", "evaluate_sets", "fit_conformal", "true_scores",
           "min_images_per_class", "save_validation", "set_metrics"]

"""Calibration: chosen by evidence among none, temperature scaling and Dirichlet calibration; its
metrics, the binary decision threshold, reliability diagrams.

:func:`choose_calibration` scores each candidate by its cross-validated NLL on the validation split
(fitted on k − 1 folds, NLL on the k-th) and keeps the lowest, refitted on the whole split.

Dirichlet calibration (Kull et al., NeurIPS 2019) is a multinomial logistic regression on the
log-probabilities, fitted with scikit-learn's ``LogisticRegression`` (L2, C = 1: Kull et al.'s
ODIR penalty is not in scikit-learn; the cross-validated NLL says whether it pays). Temperature
scaling (Guo, Pleiss, Sun and Weinberger, "On Calibration of Modern Neural Networks",
ICML 2017) divides the logits by one scalar T fitted to minimise the negative log-likelihood on
held-out data; it never changes the predicted class. The fit is scikit-learn's
(``CalibratedClassifierCV(method="temperature")`` on the frozen logits). ECE follows Guo et al.:
15 equal-width bins of the top-label confidence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_curve
from sklearn.model_selection import StratifiedKFold

from zoo.card import CalibrationInfo
from zoo.postprocess import calibrated_probs, to_probs

ECE_BINS = 15
KINDS = ("none", "temperature", "dirichlet")
FOLDS = 5
METHODS = {"none": "no calibration (the network's own probabilities)",
           "temperature": "temperature scaling (Guo et al., ICML 2017), fitted on the validation split",
           "dirichlet": "Dirichlet calibration (Kull et al., NeurIPS 2019; L2-regularised multinomial logistic "
                        "regression on the log-probabilities), fitted on the validation split"}
IDENTITY = ("identity (temperature 1): every validation image is classified correctly, so the NLL has no "
            "finite minimum (T → 0 would only make every answer 0 or 1)")
MISSING_CLASS = ("identity (temperature 1): the validation split lacks class {missing}, too few images to fit "
                 "a temperature")


class _FrozenLogits(ClassifierMixin, BaseEstimator):
    """A "classifier" whose decision function is its input: lets scikit-learn calibrate logits
    that were computed elsewhere (by the network)."""

    def __init__(self, n_classes: int = 2) -> None:
        self.n_classes = n_classes

    def fit(self, X: np.ndarray, y: np.ndarray) -> _FrozenLogits:  # noqa: N803 - scikit-learn's names
        self.classes_ = np.arange(self.n_classes)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        X = np.asarray(X, dtype=np.float64)
        return X[:, 0] if X.shape[1] == 1 else X

    def predict(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        X = np.asarray(X)
        return (X[:, 0] > 0).astype(int) if X.shape[1] == 1 else X.argmax(axis=1)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """The temperature T that minimises the NLL of ``logits / T`` on ``labels``.

    scikit-learn fits an inverse temperature β. A binary task is given to it as one decision value
    z (the single logit, or the difference of the two logits, which is all softmax sees) and it
    models ``sigmoid(2βz)``, so there T = 1 / (2β); with K > 2 logits, T = 1 / β.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if identity_reason(logits, labels, n_classes):
        return 1.0
    binary = n_classes == 2
    if binary:
        logits = logits if logits.shape[1] == 1 else (logits[:, 1] - logits[:, 0])[:, None]
    frozen = FrozenEstimator(_FrozenLogits(n_classes).fit(logits, labels))
    # One "fold" that is the whole split: the network is frozen, so scikit-learn's default 5-fold
    # cross-validation would only refuse small validation sets (< 5 images of a class).
    everything = np.arange(len(labels))
    calibrated = CalibratedClassifierCV(frozen, method="temperature", cv=[(everything, everything)]).fit(logits, labels)
    beta = float(calibrated.calibrated_classifiers_[0].calibrators[0].beta_)
    return 1.0 / (2.0 * beta) if binary else 1.0 / beta


def fit_dirichlet(logits: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[list[list[float]], list[float]]:
    """W (K, K) and b (K,) of ``softmax(W · log p + b)``, p the uncalibrated probabilities."""
    logp = np.log(np.clip(to_probs(logits).astype(np.float64), 1e-12, 1.0))
    lr = LogisticRegression(C=1.0, max_iter=2000).fit(logp, np.asarray(labels).reshape(-1))
    w, b = lr.coef_, lr.intercept_
    if n_classes == 2:  # scikit-learn's binary model is one logit for class 1: logits [0, w · x + b]
        w, b = np.vstack([np.zeros_like(w), w]), np.concatenate([[0.0], b])
    return w.tolist(), b.tolist()


def fit_kind(kind: str, logits: np.ndarray, labels: np.ndarray, n_classes: int) -> CalibrationInfo:
    """One candidate fitted on (logits, labels)."""
    if kind == "temperature":
        return CalibrationInfo(kind="temperature", method=METHODS[kind],
                               temperature=fit_temperature(logits, labels, n_classes))
    if kind == "dirichlet":
        w, b = fit_dirichlet(logits, labels, n_classes)
        return CalibrationInfo(kind="dirichlet", method=METHODS[kind], weights=w, bias=b)
    return CalibrationInfo(kind="none", method=METHODS["none"])


def cross_validated_nll(kind: str, logits: np.ndarray, labels: np.ndarray, n_classes: int, folds: int) -> float:
    """Mean NLL of ``kind`` on each fold of the validation split, fitted on the other folds."""
    labels = np.asarray(labels).reshape(-1)
    held_out = np.zeros((len(labels), n_classes))
    for fit, held in StratifiedKFold(folds, shuffle=True, random_state=0).split(logits, labels):
        held_out[held] = calibrated_probs(logits[held], fit_kind(kind, logits[fit], labels[fit], n_classes))
    return calibration_metrics(held_out, labels)["nll"]


def choose_calibration(logits: np.ndarray, labels: np.ndarray, n_classes: int) -> CalibrationInfo:
    """The candidate of :data:`KINDS` with the lowest cross-validated validation NLL, refitted on
    the whole validation split; every candidate's score in ``candidates``. Too few images of a
    class for folds (or no error to fit on): temperature 1, saying why."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels).reshape(-1)
    counts = np.bincount(labels, minlength=n_classes)
    reason = identity_reason(logits, labels, n_classes)
    folds = min(FOLDS, int(counts.min()))
    if reason or folds < 2:
        reason = reason or (f"identity (temperature 1): class {int(counts.argmin())} has {int(counts.min())} "
                            "validation image(s), too few to compare calibrations by cross-validation")
        return CalibrationInfo(kind="none", method=reason, choice=reason)
    candidates = {kind: cross_validated_nll(kind, logits, labels, n_classes, folds) for kind in KINDS}
    best = min(KINDS, key=lambda k: (candidates[k], KINDS.index(k)))
    info = fit_kind(best, logits, labels, n_classes)
    info.candidates = candidates
    others = ", ".join(f"{k} {v:.4f}" for k, v in candidates.items() if k != best)
    info.choice = (f"{best} was kept: its {folds}-fold cross-validated NLL on the validation split, "
                   f"{candidates[best]:.4f}, is the lowest (against {others}).")
    return info


def identity_reason(logits: np.ndarray, labels: np.ndarray, n_classes: int) -> str | None:
    """Why no temperature can be fitted (it is then kept at 1), or None when one can."""
    labels = np.asarray(labels).reshape(-1)
    missing = sorted(set(range(n_classes)) - set(labels.tolist()))
    if missing:
        return MISSING_CLASS.format(missing=", ".join(map(str, missing)))
    if (to_probs(logits).argmax(axis=1) == labels).all():
        return IDENTITY
    return None


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: Σ_b (n_b / N) |accuracy_b − confidence_b| over equal-width confidence bins."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def calibration_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """ECE, Brier score (mean over images of Σ_k (p_k − y_k)²) and NLL of probabilities."""
    labels = np.asarray(labels).reshape(-1)
    onehot = np.eye(probs.shape[1])[labels]
    brier = float(((probs - onehot) ** 2).sum(axis=1).mean())
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)  # float32 rows sum to 1 only within ~1e-7
    nll = float(log_loss(labels, p / p.sum(axis=1, keepdims=True), labels=list(range(probs.shape[1]))))
    return {"ece": expected_calibration_error(probs, labels), "brier": brier, "nll": nll}


def decision_threshold(probs: np.ndarray, labels: np.ndarray) -> float | None:
    """Binary tasks: the P(class 1) threshold maximising Youden's J (sensitivity + specificity − 1);
    None (the arg-max decides) when validation holds a single class and no ROC curve exists."""
    labels = np.asarray(labels).reshape(-1)
    if len(np.unique(labels)) < 2:
        return None
    fpr, tpr, thresholds = roc_curve(labels, probs[:, 1])
    best = int(np.argmax(tpr - fpr))
    return float(min(1.0, thresholds[best]))


def reliability_diagram(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    """Accuracy against confidence per bin for each ``name: (probs, labels)``, with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    for name, (probs, labels) in curves.items():
        conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
        which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, ECE_BINS - 1)
        xs = [conf[which == b].mean() for b in range(ECE_BINS) if (which == b).any()]
        ys = [correct[which == b].mean() for b in range(ECE_BINS) if (which == b).any()]
        ece = expected_calibration_error(probs, labels)
        ax.plot(xs, ys, marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set(xlabel="confidence (top class)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["ECE_BINS", "IDENTITY", "KINDS", "MISSING_CLASS", "calibration_metrics", "choose_calibration",
           "cross_validated_nll", "decision_threshold", "expected_calibration_error", "fit_dirichlet", "fit_kind",
           "fit_temperature", "identity_reason", "reliability_diagram"]

"""Calibration: temperature scaling, its metrics, the binary decision threshold, reliability diagrams.

Temperature scaling (Guo, Pleiss, Sun and Weinberger, "On Calibration of Modern Neural Networks",
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
from sklearn.metrics import log_loss, roc_curve

from zoo.postprocess import to_probs

ECE_BINS = 15
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
    nll = float(log_loss(labels, np.clip(probs, 1e-12, 1.0), labels=list(range(probs.shape[1]))))
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


__all__ = ["ECE_BINS", "IDENTITY", "MISSING_CLASS", "calibration_metrics", "decision_threshold",
           "expected_calibration_error", "fit_temperature", "identity_reason", "reliability_diagram"]

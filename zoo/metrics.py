"""Classification metrics: ACC, macro-F1, per-class recall, AUC (as medmnist.Evaluator), confusion.

Probabilities come from :func:`zoo.postprocess.to_probs` (the one rule for logits → answers).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from medmnist.evaluator import getAUC
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import confusion_matrix, f1_score, recall_score


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Everything the card and ``zoo eval`` report, from labels (N,) and probabilities (N, K)."""
    y_true = np.asarray(y_true).reshape(-1)
    k = len(labels)
    y_pred = probs.argmax(axis=1)
    task = "binary-class" if k == 2 else "multi-class"
    try:
        with warnings.catch_warnings():
            # a split missing a class has no defined AUC: nan, said once in the card, not warned per epoch
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            auc = float(getAUC(y_true, probs, task))
    except ValueError:
        auc = float("nan")
    recall = recall_score(y_true, y_pred, labels=list(range(k)), average=None, zero_division=0)
    return {
        "n": len(y_true),
        "acc": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=list(range(k)), average="macro", zero_division=0)
        ),
        "auc": auc,
        "per_class_recall": {labels[i]: float(r) for i, r in enumerate(recall)},
        "confusion": confusion_matrix(y_true, y_pred, labels=list(range(k))).tolist(),
    }

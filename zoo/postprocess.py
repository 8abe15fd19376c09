"""How logits become an answer (numpy only: the ONNX path, serving and scoring import no torch).

One rule everywhere — training metrics, evaluation, export parity, serving, scoring, the Python
API, ensembles:

* a head of K ≥ 2 logits gives ``softmax(logits)``;
* a single-logit head (BCE / hinge losses) gives ``[1 - sigmoid(z), sigmoid(z)]``;
* the predicted class is the argmax of those probabilities (for a single logit: ``z > 0``; a tie
  at exactly 0 goes to class 0, as argmax does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float64, returned as float32."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function in float64 without overflow warnings."""
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def to_probs(logits: Any) -> np.ndarray:
    """Class probabilities (N, K) float32 from logits (N, K); a single logit gives [1 - p, p]."""
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"logits must be (N, K), not of shape {x.shape}")
    if x.shape[1] == 1:
        p = sigmoid(x[:, 0])
        return np.stack([1.0 - p, p], axis=1).astype(np.float32)
    return softmax(x, axis=1)


def predicted_class(logits: Any) -> np.ndarray:
    """The predicted class (N,) int64 of logits (N, K): argmax of :func:`to_probs`."""
    return to_probs(logits).argmax(axis=1).astype(np.int64)


def top_classes(probs: np.ndarray, labels: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes of one image, best first (ties: lower class index first)."""
    order = np.argsort(-np.asarray(probs), kind="stable")[: min(k, len(labels))]
    return [{"class": int(i), "label": labels[int(i)], "prob": float(probs[int(i)])} for i in order]


__all__ = ["predicted_class", "sigmoid", "softmax", "to_probs", "top_classes"]

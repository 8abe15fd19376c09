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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from zoo.errors import ExplainError, unknown

if TYPE_CHECKING:
    from zoo.card import ModelInfo


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


def class_index(target: int | str, labels: Sequence[str]) -> int:
    """A class given by index (``2``, ``"2"``) or label name (exact, then case-insensitive); an
    :class:`~zoo.errors.ExplainError` or :class:`~zoo.errors.UnknownNameError` ("did you mean")
    when the model has no such class."""
    text = str(target).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < len(labels):
            raise ExplainError(f"class {index} does not exist: the model has classes 0 to {len(labels) - 1}")
        return index
    if text in labels:
        return list(labels).index(text)
    lowered = [label.lower() for label in labels]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    raise unknown("class", text, labels, hint="classes: " + ", ".join(f"{i} {lab}" for i, lab in enumerate(labels)))


@dataclass
class Predictions:
    """What a model says about N images, as every front end reports it (HTTP, scoring, Python API).

    ``probs`` are the model's answer under the one rule above (calibrated once the card carries a
    calibration); ``ood_score`` / ``in_distribution`` are filled once the card carries an
    out-of-distribution detector (None until then).
    """

    probs: np.ndarray  # (N, K) float32
    classes: np.ndarray  # (N,) int64
    calibrated: bool = False
    ood_score: np.ndarray | None = None  # (N,) float32, higher = more unlike the training data
    in_distribution: np.ndarray | None = None  # (N,) bool

    def __len__(self) -> int:
        return len(self.classes)


def calibrated_probs(logits: Any, temperature: float | None) -> np.ndarray:
    """:func:`to_probs` of ``logits / T`` (temperature scaling; ``None``: uncalibrated)."""
    x = np.asarray(logits, dtype=np.float32)
    return to_probs(x if temperature is None else x / np.float32(temperature))


def interpret(logits: Any, info: ModelInfo | None = None, ood_score: Any = None) -> Predictions:
    """The answer of one model for a batch of logits (N, K'), with what its card knows: the
    temperature of its calibration, and the threshold of its out-of-distribution score (an output
    of the exported model, ``ood_score``: above the threshold the image is flagged)."""
    calibration = info.calibration if info is not None else None
    probs = calibrated_probs(logits, calibration.temperature if calibration is not None else None)
    out = Predictions(probs=probs, classes=probs.argmax(axis=1).astype(np.int64), calibrated=calibration is not None)
    if ood_score is not None and info is not None and info.ood is not None:
        out.ood_score = np.asarray(ood_score, dtype=np.float32).reshape(-1)
        out.in_distribution = out.ood_score <= info.ood.threshold
    return out


__all__ = ["Predictions", "calibrated_probs", "class_index", "interpret", "predicted_class", "sigmoid", "softmax",
           "to_probs", "top_classes"]

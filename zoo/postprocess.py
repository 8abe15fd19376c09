"""How logits become an answer (numpy only: the ONNX path, serving and scoring import no torch).

One rule everywhere — training metrics, evaluation, export parity, serving, scoring, the Python
API, ensembles:

* a head of K ≥ 2 logits gives ``softmax(logits)``;
* a single-logit head (BCE / hinge losses) gives ``[1 - sigmoid(z), sigmoid(z)]``;
* the predicted class is the argmax of those probabilities (for a single logit: ``z > 0``; a tie
  at exactly 0 goes to class 0, as argmax does);
* with a calibration in the card, the probabilities are the calibrated ones (:func:`calibrated_probs`);
* with conformal scores in the card, each answer carries a prediction set at level 1 − α
  (:func:`prediction_sets`): the classes whose conformal p-value is at least α, never empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from zoo.errors import ExplainError, UsageError, unknown

if TYPE_CHECKING:
    from zoo.card import CalibrationInfo, ConformalInfo, ModelInfo


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
    out-of-distribution detector, ``sets`` (which classes are in each image's prediction set at
    level 1 − ``alpha``) once it carries conformal scores (None until then).
    """

    probs: np.ndarray  # (N, K) float32
    classes: np.ndarray  # (N,) int64
    calibrated: bool = False
    ood_score: np.ndarray | None = None  # (N,) float32, higher = more unlike the training data
    in_distribution: np.ndarray | None = None  # (N,) bool
    sets: np.ndarray | None = None  # (N, K) bool
    alpha: float | None = None

    def __len__(self) -> int:
        return len(self.classes)

    def prediction_set(self, n: int, labels: Sequence[str]) -> list[str] | None:
        """Image ``n``'s prediction set as labels, most probable first (None without conformal scores)."""
        return None if self.sets is None else set_labels(self.sets[n], self.probs[n], labels)


def set_labels(members: np.ndarray, probs: np.ndarray, labels: Sequence[str]) -> list[str]:
    """The labels of one image's set (``members``: (K,) bool), most probable first (ties: lower class)."""
    idx = np.flatnonzero(members)
    return [labels[int(k)] for k in idx[np.argsort(-np.asarray(probs)[idx], kind="stable")]]


def two_class_logits(logits: np.ndarray) -> np.ndarray:
    """(N, K) logits with K ≥ 2: a single logit z becomes [0, z] (the same probabilities)."""
    x = np.asarray(logits, dtype=np.float32)
    return np.concatenate([np.zeros_like(x), x], axis=1) if x.shape[1] == 1 else x


def calibrated_logits(logits: Any, calibration: CalibrationInfo | None) -> np.ndarray:
    """Logits whose :func:`to_probs` are the calibrated probabilities: ``z / T`` (temperature),
    ``W · log softmax(z) + b`` (Dirichlet; always K ≥ 2 columns), ``z`` (none or no calibration)."""
    x = np.asarray(logits, dtype=np.float32)
    if calibration is None or calibration.kind == "none":
        return x
    if calibration.kind == "dirichlet":
        logp = np.log(np.clip(to_probs(x).astype(np.float64), 1e-12, 1.0))
        w, b = np.asarray(calibration.weights, dtype=np.float64), np.asarray(calibration.bias, dtype=np.float64)
        return (logp @ w.T + b).astype(np.float32)
    return x / np.float32(calibration.temperature)


def calibrated_probs(logits: Any, calibration: CalibrationInfo | None) -> np.ndarray:
    """:func:`to_probs` of :func:`calibrated_logits` (``None``: uncalibrated)."""
    return to_probs(calibrated_logits(logits, calibration))


def check_alpha(alpha: Any) -> float | None:
    """α of a prediction set (the allowed miss rate): a number strictly between 0 and 1, or None
    (the card's); otherwise a :class:`~zoo.errors.UsageError` (a ``ValueError``) saying so."""
    if alpha is None:
        return None
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise UsageError(f"alpha must be a number between 0 and 1 (e.g. 0.1 for 90 % sets), not {alpha!r}") from None
    if not 0.0 < value < 1.0:  # NaN fails it too
        raise UsageError(f"alpha must be strictly between 0 and 1 (e.g. 0.1 for 90 % sets), not {alpha!r}")
    return value


def conformity_scores(probs: np.ndarray, score: str = "lac", raps_lambda: float = 0.0, raps_k: int = 0) -> np.ndarray:
    """(N, K) conformity score of every candidate class (higher = less conforming).

    LAC (Sadinle et al. 2019): 1 − p_k. APS (Romano et al. 2020, not randomised): the probability
    mass of the classes ranked at or above k. RAPS (Angelopoulos et al. 2021): APS plus
    ``raps_lambda`` per rank past ``raps_k``."""
    p = np.asarray(probs, dtype=np.float64)
    if score == "lac":
        return 1.0 - p
    order = np.argsort(-p, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(p.shape[1])[None, :].repeat(len(p), axis=0), axis=1)
    mass = np.take_along_axis(np.cumsum(np.take_along_axis(p, order, axis=1), axis=1), ranks, axis=1)
    if score == "raps":
        mass = mass + raps_lambda * np.maximum(0, ranks + 1 - raps_k)
    return mass


def calibration_scores(probs: np.ndarray, labels: np.ndarray, score: str, mondrian: bool, raps_lambda: float = 0.0,
                       raps_k: int = 0) -> list[list[float]]:
    """The sorted conformity scores of the true classes of labelled images: what a conformal
    predictor keeps (one list per class when ``mondrian``)."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    true = conformity_scores(probs, score, raps_lambda, raps_k)[np.arange(len(labels)), labels]
    if not mondrian:
        return [np.sort(true).tolist()]
    return [np.sort(true[labels == k]).tolist() for k in range(np.asarray(probs).shape[1])]


def prediction_sets(probs: np.ndarray, conformal: ConformalInfo, alpha: float | None = None) -> np.ndarray:
    """(N, K) bool: class k is in image n's set when its conformal p-value
    ``(#{validation scores ≥ s_nk} + 1) / (n_cal + 1)`` is at least α (crepes' non-smoothed rule;
    the validation scores of class k alone when Mondrian). The predicted class is always in the set,
    so no answer is empty (coverage can only rise)."""
    a = check_alpha(alpha) or conformal.alpha
    s = conformity_scores(probs, conformal.score, conformal.raps_lambda, conformal.raps_k)
    out = np.zeros(s.shape, dtype=bool)
    for k in range(s.shape[1]):
        cal = np.asarray(conformal.scores[k] if conformal.mondrian else conformal.scores[0], dtype=np.float64)
        at_least = len(cal) - np.searchsorted(cal, s[:, k], side="left")
        out[:, k] = (at_least + 1) / (len(cal) + 1) >= a
    out[np.arange(len(s)), np.asarray(probs).argmax(axis=1)] = True
    return out


def interpret(logits: Any, info: ModelInfo | None = None, ood_score: Any = None,
              alpha: float | None = None) -> Predictions:
    """The answer of one model for a batch of logits (N, K'), with what its card knows: its
    calibration, the threshold of its out-of-distribution score (an output of the exported model,
    ``ood_score``: above the threshold the image is flagged), and its conformal scores (the
    prediction set at level 1 − ``alpha``, default the card's)."""
    calibration = info.calibration if info is not None else None
    probs = calibrated_probs(logits, calibration)
    out = Predictions(probs=probs, classes=probs.argmax(axis=1).astype(np.int64), calibrated=calibration is not None)
    if ood_score is not None and info is not None and info.ood is not None:
        out.ood_score = np.asarray(ood_score, dtype=np.float32).reshape(-1)
        out.in_distribution = out.ood_score <= info.ood.threshold
    return with_sets(out, info.conformal if info is not None else None, alpha)


def with_sets(answer: Predictions, conformal: ConformalInfo | None, alpha: float | None) -> Predictions:
    """``answer`` with its prediction sets (unchanged without conformal scores)."""
    if conformal is not None:
        answer.alpha = check_alpha(alpha) or conformal.alpha
        answer.sets = prediction_sets(answer.probs, conformal, answer.alpha)
    return answer


__all__ = ["Predictions", "calibrated_logits", "calibration_scores", "calibrated_probs", "check_alpha",
           "class_index", "conformity_scores", "interpret", "predicted_class", "prediction_sets", "set_labels",
           "sigmoid", "softmax", "to_probs", "top_classes", "two_class_logits", "with_sets"]

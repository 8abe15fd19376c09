"""The one ensemble: which bundles form it, whether they fit together, how their logits combine.

Used alike by ``/pathology_ensemble`` (serving), ``zoo score --ensemble`` (scoring) and the Python
API, so the same images give the same probabilities and classes everywhere (a test checks it).

* Members: :func:`choose_members` — a task's (or dataset's) bundles of one architecture, ranked
  by validation metrics (model selection never looks at test), the best ``n`` or all of them.
* Compatibility: :func:`check_compatible` — same labels, same output head, same input images
  (channels and resolution); otherwise :class:`~zoo.errors.EnsembleError` naming the misfit.
* Combination: :func:`combine` — the mean of the members' logits (each divided by its member's
  calibration temperature when it has one), then the one rule of :mod:`zoo.postprocess` (softmax,
  or sigmoid for a single-logit head) for probabilities and the predicted class; ``agreement`` is
  the fraction of members whose own predicted class is the ensemble's. With out-of-distribution
  detectors, the ensemble's ``ood_score`` is the mean over members of their score minus their own
  threshold, and an image is in distribution when that mean is not above 0.
* Prediction sets: :func:`ensemble_conformal` — the members' conformal score and Mondrian choice,
  fitted on the ensemble's own calibrated validation probabilities (from the validation logits each
  member bundle keeps), so the set follows the ensemble's answer, not one member's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.card import CARD, ConformalInfo, ModelInfo, read_card
from zoo.errors import BundleError, EnsembleError
from zoo.io import sha256_of
from zoo.postprocess import Predictions, calibrated_logits, calibration_scores, to_probs, two_class_logits, with_sets
from zoo.store import ModelRef, bundles_dir, dataset_of, rank_bundles, resolve_target

log = logging.getLogger(__name__)

COMBINE = "mean of logits"


@dataclass(kw_only=True)
class EnsemblePredictions(Predictions):
    """An ensemble's answer for N images from M members of K classes: a model's
    :class:`~zoo.postprocess.Predictions` (``ood_score`` is the mean over members of their score
    minus their threshold) and what the members say."""

    logits: np.ndarray  # (N, K') mean of the members' (calibrated) logits; K' = 1 for a single-logit head
    agreement: np.ndarray  # (N,) float32 in [0, 1]: the fraction of members whose class is the ensemble's
    member_classes: np.ndarray  # (N, M) int64
    member_probs: np.ndarray  # (N, M, K) float32


def _calibrated(member_logits: Sequence[np.ndarray] | np.ndarray, members: Sequence[ModelInfo] | None) -> np.ndarray:
    """(M, N, K') each member's calibrated logits (K' = 1 only when every member keeps one logit)."""
    cals = [mi.calibration for mi in members] if members else [None] * len(member_logits)
    out = [calibrated_logits(m, c) for m, c in zip(member_logits, cals, strict=True)]
    if len({o.shape[1] for o in out}) > 1:  # a Dirichlet-calibrated member answers with K columns
        out = [two_class_logits(o) for o in out]
    return np.stack(out)


def _ood(members: Sequence[ModelInfo] | None, scores: Sequence[np.ndarray | None] | None) -> np.ndarray | None:
    """Mean over members of (score − the member's threshold), when every member has a detector."""
    if not members or scores is None or any(s is None for s in scores) or any(mi.ood is None for mi in members):
        return None
    margins = [np.asarray(s, dtype=np.float64).reshape(-1) - mi.ood.threshold  # type: ignore[union-attr]
               for s, mi in zip(scores, members, strict=True)]
    return np.mean(margins, axis=0).astype(np.float32)


def combine(member_logits: Sequence[np.ndarray] | np.ndarray, members: Sequence[ModelInfo] | None = None,
            ood_scores: Sequence[np.ndarray | None] | None = None, conformal: ConformalInfo | None = None,
            alpha: float | None = None) -> EnsemblePredictions:
    """Combine logits of shape (M, N, K') — one (N, K') array per member — with what the members'
    cards say (calibrations, out-of-distribution thresholds); with the ensemble's ``conformal``
    (:func:`ensemble_conformal`), each answer's prediction set at level 1 − ``alpha``."""
    shapes = {np.shape(m) for m in member_logits}
    if len(member_logits) < 1 or len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise EnsembleError(f"member logits must be (M, N, K), not {sorted(shapes)}")
    stacked = _calibrated([np.asarray(m, dtype=np.float32) for m in member_logits], members)
    mean = stacked.mean(axis=0, dtype=np.float64).astype(np.float32)
    probs = to_probs(mean)
    classes = probs.argmax(axis=1).astype(np.int64)
    member_probs = np.stack([to_probs(m) for m in stacked], axis=1)  # (N, M, K)
    member_classes = member_probs.argmax(axis=2).astype(np.int64)  # (N, M)
    agreement = (member_classes == classes[:, None]).mean(axis=1).astype(np.float32)
    calibrated = bool(members) and all(mi.calibration is not None for mi in members or ())
    ood = _ood(members, ood_scores)
    answer = EnsemblePredictions(probs=probs, classes=classes, calibrated=calibrated, ood_score=ood,
                                 in_distribution=None if ood is None else ood <= 0, logits=mean, agreement=agreement,
                                 member_classes=member_classes, member_probs=member_probs)
    return with_sets(answer, conformal, alpha)


def bundle_dir(target: str | Path) -> Path | None:
    """The bundle a model file or directory belongs to (None for a lone ``.onnx`` file)."""
    p = Path(target)
    for d in (p, p.parent):
        if (d / CARD).is_file():
            return d
    return None


def _validation(target: str | Path, info: ModelInfo) -> tuple[np.ndarray, np.ndarray] | None:
    """A member's validation logits and labels, when its bundle keeps them unchanged."""
    from safetensors.numpy import load_file  # numpy only: the ONNX path stays torch-free

    bundle, conf = bundle_dir(target), info.conformal
    if bundle is None or conf is None or not (bundle / conf.validation_file).is_file():
        return None
    path = bundle / conf.validation_file
    if conf.validation_sha256 and sha256_of(path) != conf.validation_sha256:
        log.warning("%s does not match the sha256 in its card: no prediction sets from it", path)
        return None
    data = load_file(str(path))
    return data["logits"], data["labels"]


def ensemble_conformal(targets: Sequence[str | Path], members: Sequence[ModelInfo]) -> ConformalInfo | None:
    """The ensemble's conformal predictor: the first member's score and Mondrian choice, its scores
    computed from the ensemble's calibrated probabilities on the shared validation split. None (no
    sets) when a member has no conformal scores or validation logits, or the members were validated
    on different images."""
    parts = [_validation(t, mi) for t, mi in zip(targets, members, strict=True)]
    if not members or any(p is None for p in parts):
        return None
    labels = parts[0][1]  # type: ignore[index]
    if any(len(p[1]) != len(labels) or not np.array_equal(p[1], labels) for p in parts):  # type: ignore[index]
        log.warning("the ensemble's members were validated on different images: no prediction sets")
        return None
    probs = to_probs(_calibrated([p[0] for p in parts], members).mean(axis=0))  # type: ignore[index]
    first = members[0].conformal
    assert first is not None
    scores = calibration_scores(probs, labels, first.score, first.mondrian, first.raps_lambda, first.raps_k)
    return first.model_copy(update={
        "scores": scores, "metrics": {}, "candidates": {}, "validation_sha256": "",
        "method": first.method.split(";")[0] + f"; of the ensemble's calibrated validation probabilities "
                                                f"({len(members)} members, {COMBINE})"})


def check_compatible(members: Sequence[ModelInfo]) -> None:
    """Members must share labels, output head and input images; raise :class:`EnsembleError`."""
    if len(members) < 2:
        raise EnsembleError(f"an ensemble needs at least two members, not {len(members)}")
    first = members[0]
    a = first.preprocessing
    for m in members[1:]:
        if m.labels != first.labels:
            raise EnsembleError(f"ensemble members disagree on labels: {first.id} {first.labels} vs {m.id} {m.labels}")
        if m.num_outputs != first.num_outputs:
            raise EnsembleError(f"ensemble members have different heads: {first.id} {first.num_outputs} "
                                f"output(s) vs {m.id} {m.num_outputs}")
        b = m.preprocessing
        if (a.image_size, a.in_channels) != (b.image_size, b.in_channels):
            raise EnsembleError(f"ensemble members take different images: {first.id} "
                                f"{a.in_channels}x{a.image_size}px vs {m.id} {b.in_channels}x{b.image_size}px")


def choose_members(task: str, store: Path | None = None, arch: str | None = None,
                   n: int | None = None) -> list[Path]:
    """The best ``n`` (default: all) bundles of ``task``'s dataset with architecture ``arch``
    (default: the architecture of its best bundle), ranked by validation metrics."""
    if (Path(task).expanduser() / CARD).is_file() or (bundles_dir(store) / task / CARD).is_file():
        raise EnsembleError("an ensemble from a single model needs a task or dataset name (its best bundles "
                            "of one architecture are used); or name each member")
    if n is not None and n < 2:
        raise EnsembleError("an ensemble needs at least two members (ensemble size >= 2)")
    if arch is None:
        ranked_all = rank_bundles(task, store)
        if not ranked_all:
            raise BundleError(f"no bundle found for {task!r}")
        arch = ranked_all[0][1].arch
    ranked = rank_bundles(task, store, arch)
    if len(ranked) < 2:
        raise EnsembleError(f"an ensemble for {task!r} needs at least two {arch} bundles of {dataset_of(task)}; "
                            f"the store has {len(ranked)}")
    if n is not None and len(ranked) < n:
        log.warning("only %d %s bundles of %s: the ensemble has %d members, not %d",
                    len(ranked), arch, dataset_of(task), len(ranked), n)
    return [p for p, _ in ranked[: n or len(ranked)]]


def resolve_models(refs: Sequence[ModelRef], ensemble: bool = False, size: int | None = None,
                   arch: str | None = None, store: Path | None = None) -> list[Path]:
    """The bundle directories (or lone ``.onnx`` files) that model references name: the one way
    :func:`zoo.load` and ``zoo score`` read them. One reference with ``ensemble``: a task's best
    ``size`` (default all) bundles of one architecture (:func:`choose_members`); otherwise one target
    per reference (:func:`zoo.store.resolve_target`), none of them twice."""
    if not refs:
        raise EnsembleError("give a model: a bundle path, a bundle id, a task name or an .onnx file")
    if ensemble and len(refs) == 1:
        return choose_members(str(refs[0]), store, arch, size)
    targets = [resolve_target(ref, store) for ref in refs]
    if len({t.resolve() for t in targets}) != len(targets):
        raise EnsembleError("the same model is given twice in the ensemble")
    return targets


def member_cards(paths: Sequence[Path]) -> list[ModelInfo]:
    """The cards of the member bundles (for :func:`check_compatible` before any session opens)."""
    return [read_card(p) for p in paths]


__all__ = ["COMBINE", "EnsemblePredictions", "bundle_dir", "check_compatible", "choose_members", "combine",
           "ensemble_conformal", "member_cards", "resolve_models"]

"""The models that score: ONNX files of bundles (exported on demand), single or as an ensemble
(:mod:`zoo.ensemble`: the same member choice, checks and combination as the service)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.ensemble import check_compatible, choose_members, combine
from zoo.errors import EnsembleError
from zoo.io import sha256_of
from zoo.postprocess import interpret
from zoo.runtime import OOD_OUTPUT, OnnxModel, bundle_card
from zoo.store import resolve_bundle

log = logging.getLogger(__name__)


def ensure_onnx(target: Path) -> Path:
    """The ONNX file of a bundle (exported first if the bundle has none), or a lone ``.onnx``."""
    if target.is_file():
        return target
    # torch is imported only here, when a bundle has no ONNX file yet
    from export.exporter import ensure_exported

    return ensure_exported(target, ("onnx",))["onnx"]


def model_identity(model: OnnxModel) -> dict[str, str]:
    """What a journal records of a model: its id and the sha256 of the ONNX file that scores.

    Inside a bundle the sha256 is the one ``zoo export`` recorded in the card (which
    :meth:`OnnxModel.open` has just verified); a lone file is hashed.
    """
    card = bundle_card(model.path)
    records = card.exports.values() if card is not None else ()
    digest = next((r.sha256 for r in records if r.file == model.path.name), None)
    return {"id": model.model_id, "onnx_sha256": str(digest or sha256_of(model.path))}


def resolve_models(refs: Sequence[str | Path], ensemble: bool = False, ensemble_size: int = 2,
                   store: Path | None = None) -> list[Path]:
    """Bundle directories (or lone ``.onnx`` files) for the ``--model`` references."""
    if not refs:
        raise ValueError("give a model: a bundle path, a bundle id or a task name")
    if len(refs) > 1 and not ensemble:
        raise ValueError("several models are only scored together as an ensemble (--ensemble)")
    if ensemble and len(refs) == 1:
        members = choose_members(str(refs[0]), store, n=ensemble_size)
    else:
        members = []
        for ref in refs:
            p = Path(ref).expanduser()
            members.append(p if p.is_file() and p.suffix == ".onnx" else resolve_bundle(str(ref), store))
    if len({m.resolve() for m in members}) != len(members):
        raise EnsembleError("the same model is given twice in the ensemble")
    return members


def open_models(targets: Sequence[Path], threads: int | None = None,
                providers: Sequence[str] | None = None) -> list[OnnxModel]:
    """ONNX Runtime sessions for the targets; ensemble members must fit together."""
    models = [OnnxModel.open(ensure_onnx(t), providers=providers, threads=threads) for t in targets]
    if len(models) > 1:
        check_compatible([m.meta for m in models])
    return models


@dataclass
class Scores:
    """Per-image results of one chunk (images that decoded)."""

    top: np.ndarray  # (n,) int
    probs: np.ndarray  # (n, K) float32, calibrated when the model(s) are
    agreement: np.ndarray | None  # (n,) float32, ensembles only
    ood_score: np.ndarray | None = None  # (n,) float32, models with an out-of-distribution detector
    in_distribution: np.ndarray | None = None  # (n,) bool


def has_ood(models: Sequence[OnnxModel]) -> bool:
    """Whether every model returns an out-of-distribution score (then the output has its columns)."""
    return all(m.has_ood and m.meta.ood is not None for m in models)


def _run(m: OnnxModel, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits and (when the file has it) the OOD score of one model, batched."""
    parts = [m.outputs(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    if not parts:
        return np.zeros((0, m.meta.num_outputs), np.float32), None
    logits = np.concatenate([p[m.output_names[0]] for p in parts])
    ood = np.concatenate([p[OOD_OUTPUT] for p in parts]) if OOD_OUTPUT in parts[0] else None
    return logits, ood


def infer(models: Sequence[OnnxModel], images: np.ndarray, batch_size: int) -> Scores:
    """Answers of a model (:func:`zoo.postprocess.interpret`) or an ensemble (:func:`zoo.ensemble.combine`)."""
    results = [_run(m, images, batch_size) for m in models]
    if len(models) == 1:
        (logits, ood), = results
        p = interpret(logits, models[0].meta, ood)
        return Scores(p.classes, p.probs, None, p.ood_score, p.in_distribution)
    out = combine([r[0] for r in results], [m.meta for m in models], [r[1] for r in results])
    return Scores(out.classes, out.probs, out.agreement, out.ood_score, out.in_distribution)

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
from zoo.postprocess import to_probs
from zoo.runtime import OnnxModel, bundle_card
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
    probs: np.ndarray  # (n, K) float32
    agreement: np.ndarray | None  # (n,) float32, ensembles only


def infer(models: Sequence[OnnxModel], images: np.ndarray, batch_size: int) -> Scores:
    """Batched logits of every model; an ensemble combines them as :func:`zoo.ensemble.combine`."""
    logits = []
    for m in models:
        parts = [m.predict(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        logits.append(np.concatenate(parts) if parts else np.zeros((0, m.meta.num_outputs), np.float32))
    if len(models) == 1:
        probs = to_probs(logits[0])
        return Scores(probs.argmax(1), probs, None)
    out = combine(logits)
    return Scores(out.classes, out.probs, out.agreement)

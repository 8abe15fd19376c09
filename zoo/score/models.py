"""The models that score: ONNX files of bundles (exported on demand), single or as an ensemble
(:mod:`zoo.ensemble`: the same member choice, checks and combination as the service)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zoo.card import ConformalInfo
from zoo.ensemble import check_compatible, combine, ensemble_conformal
from zoo.ensemble import resolve_models as resolve_refs
from zoo.errors import UsageError
from zoo.io import sha256_of
from zoo.postprocess import Predictions, interpret
from zoo.runtime import OOD_OUTPUT, OnnxModel, RuntimeOptions, bundle_card
from zoo.store import ModelRef

log = logging.getLogger(__name__)


def ensure_onnx(target: Path, options: RuntimeOptions | None = None) -> Path:
    """The ONNX file of a bundle (exported first if the bundle has none, parity-checked on ONNX Runtime
    with ``options``), or a lone ``.onnx``."""
    if target.is_file():
        return target
    # torch is imported only here, when a bundle has no ONNX file yet
    from export.exporter import ensure_exported

    return ensure_exported(target, ("onnx",), options=options)["onnx"]


def model_identity(model: OnnxModel) -> dict[str, str]:
    """What a journal records of a model: its id and the sha256 of the ONNX file that scores.

    Inside a bundle the sha256 is the one ``zoo export`` recorded in the card (which
    :meth:`OnnxModel.open` has just verified); a lone file is hashed.
    """
    card = bundle_card(model.path)
    records = card.exports.values() if card is not None else ()
    digest = next((r.sha256 for r in records if r.file == model.path.name), None)
    return {"id": model.id, "onnx_sha256": str(digest or sha256_of(model.path))}


def resolve_models(refs: Sequence[ModelRef], ensemble: bool = False, ensemble_size: int = 2,
                   store: Path | None = None) -> list[Path]:
    """Bundle directories (or lone ``.onnx`` files) for the ``--model`` references
    (:func:`zoo.ensemble.resolve_models`, as :func:`zoo.load`); several only with ``--ensemble``."""
    if len(refs) > 1 and not ensemble:
        raise UsageError("several models are only scored together as an ensemble (--ensemble)")
    return resolve_refs(refs, ensemble, ensemble_size, store=store)


def open_models(targets: Sequence[Path], options: RuntimeOptions | None = None) -> list[OnnxModel]:
    """ONNX Runtime sessions (made with ``options``) for the targets; ensemble members must fit together."""
    models = [OnnxModel.open(ensure_onnx(t, options), options) for t in targets]
    if len(models) > 1:
        check_compatible([m.meta for m in models])
    return models


def sets_conformal(models: Sequence[OnnxModel]) -> ConformalInfo | None:
    """The conformal scores of the prediction sets: the model's card's, or the ensemble's own."""
    metas = [m.meta for m in models]
    return ensemble_conformal([m.path for m in models], metas) if len(models) > 1 else metas[0].conformal


def _run(m: OnnxModel, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits and (when the file has it) the OOD score of one model, batched."""
    parts = [m.outputs(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    if not parts:
        return np.zeros((0, m.meta.num_outputs), np.float32), None
    logits = np.concatenate([p[m.output_names[0]] for p in parts])
    ood = np.concatenate([p[OOD_OUTPUT] for p in parts]) if OOD_OUTPUT in parts[0] else None
    return logits, ood


def infer(models: Sequence[OnnxModel], images: np.ndarray, batch_size: int) -> Predictions:
    """Answers of a model (:func:`zoo.postprocess.interpret`) or an ensemble (:func:`zoo.ensemble.combine`:
    :class:`~zoo.ensemble.EnsemblePredictions`, with the members' ``agreement``)."""
    results = [_run(m, images, batch_size) for m in models]
    if len(models) == 1:
        (logits, ood), = results
        return interpret(logits, models[0].meta, ood)
    return combine([r[0] for r in results], [m.meta for m in models], [r[1] for r in results])

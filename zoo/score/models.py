"""The models that score: ONNX files of bundles (exported on demand), single or as an ensemble."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.bundle import BundleError, read_card, sha256_of
from zoo.metrics import to_probs
from zoo.runtime import ONNX_FILE, ModelFileError, OnnxModel, bundle_card
from zoo.store import best_bundle, bundles_dir, rank_bundles, resolve_bundle

log = logging.getLogger(__name__)


def ensure_onnx(target: Path) -> Path:
    """The ONNX file of a bundle (exported first if the bundle has none), or a lone ``.onnx``."""
    if target.is_file():
        return target
    onnx_path = target / ONNX_FILE
    if not onnx_path.is_file():
        from export import ExportError
        from export.onnx_export import export_onnx
        from export.parity import ParityError

        log.warning("%s has no %s yet: exporting it first", target.name, ONNX_FILE)
        try:
            export_onnx(target)
        except (ExportError, ParityError) as e:
            raise ModelFileError(f"{target} has no {ONNX_FILE} and exporting it failed: {e}") from e
    return onnx_path


def model_identity(model: OnnxModel) -> dict[str, str]:
    """What a journal records of a model: its id and the sha256 of the ONNX file that scores.

    Inside a bundle the sha256 is the one ``zoo export`` recorded in the card (which
    :meth:`OnnxModel.open` has just verified); a lone file is hashed.
    """
    card = bundle_card(model.path)
    records = (card or {}).get("exports") or {}
    digest = next((r.get("sha256") for r in records.values()
                   if isinstance(r, dict) and r.get("file") == model.path.name), None)
    return {"id": model.model_id, "onnx_sha256": str(digest or sha256_of(model.path))}


def ensemble_members(task: str, n: int, store: Path | None = None) -> list[Path]:
    """The best ``n`` bundles of one architecture for a task: the best bundle's arch, ranked by validation."""
    if n < 2:
        raise ValueError("an ensemble needs at least two members (--ensemble-size >= 2)")
    if (Path(task).expanduser() / "card.json").is_file() or (bundles_dir(store) / task / "card.json").is_file():
        raise ValueError("--ensemble with a single --model needs a task or dataset name "
                         "(its best bundles of one architecture are used); or give --model several times")
    best = best_bundle(task, store)
    if best is None:
        raise BundleError(f"no bundle found for {task!r}")
    card = read_card(best)
    flag, arch = card["dataset"]["name"], card["arch"]
    ranked = rank_bundles(flag, store, arch)
    if len(ranked) < 2:
        raise BundleError(f"an ensemble for {task!r} needs at least two {arch} bundles of {flag}; "
                          f"the store has {len(ranked)}")
    if len(ranked) < n:
        log.warning("only %d %s bundles of %s: the ensemble has %d members, not %d",
                    len(ranked), arch, flag, len(ranked), n)
    return [p for p, _ in ranked[:n]]


def resolve_models(refs: Sequence[str | Path], ensemble: bool = False, ensemble_size: int = 2,
                   store: Path | None = None) -> list[Path]:
    """Bundle directories (or lone ``.onnx`` files) for the ``--model`` references."""
    if not refs:
        raise ValueError("give a model: a bundle path, a bundle id or a task name")
    if len(refs) > 1 and not ensemble:
        raise ValueError("several models are only scored together as an ensemble (--ensemble)")
    if ensemble and len(refs) == 1:
        members = ensemble_members(str(refs[0]), ensemble_size, store)
    else:
        members = []
        for ref in refs:
            p = Path(ref).expanduser()
            members.append(p if p.is_file() and p.suffix == ".onnx" else resolve_bundle(str(ref), store))
    if len({m.resolve() for m in members}) != len(members):
        raise ValueError("the same model is given twice in the ensemble")
    return members


def open_models(targets: Sequence[Path], threads: int | None = None,
                providers: Sequence[str] | None = None) -> list[OnnxModel]:
    """ONNX Runtime sessions for the targets; ensemble members must share labels and input format."""
    models = [OnnxModel.open(ensure_onnx(t), providers=providers, threads=threads) for t in targets]
    first = models[0]
    for m in models[1:]:
        if m.labels != first.labels:
            raise ValueError(f"ensemble members disagree on labels: {first.model_id} {first.labels} vs "
                             f"{m.model_id} {m.labels}")
        a, b = first.preprocessing, m.preprocessing
        if (a.image_size, a.in_channels) != (b.image_size, b.in_channels):
            raise ValueError(f"ensemble members take different images: {first.model_id} "
                             f"{a.in_channels}x{a.image_size}px vs {m.model_id} {b.in_channels}x{b.image_size}px")
    return models


@dataclass
class Scores:
    """Per-image results of one chunk (images that decoded)."""

    top: np.ndarray  # (n,) int
    probs: np.ndarray  # (n, K) float32
    agreement: np.ndarray | None  # (n,) float32, ensembles only


def infer(models: Sequence[OnnxModel], images: np.ndarray, batch_size: int) -> Scores:
    """Batched logits of every model; ensembles average the logits, then take probabilities."""
    logits = []
    for m in models:
        parts = [m.predict(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        logits.append(np.concatenate(parts) if parts else np.zeros((0, len(m.labels)), np.float32))
    if len(models) == 1:
        probs = to_probs(logits[0]).astype(np.float32)
        return Scores(probs.argmax(1), probs, None)
    probs = to_probs(np.stack(logits).mean(axis=0)).astype(np.float32)
    top = probs.argmax(1)
    member_top = np.stack([to_probs(lg).argmax(1) for lg in logits])
    return Scores(top, probs, (member_top == top[None]).mean(axis=0).astype(np.float32))

"""``zoo explain BUNDLE IMAGE... --out DIR``: per image a heat map and an overlay PNG, plus
``explanations.json`` saying what each picture explains.

Images are read with :func:`zoo.preprocess.load_image` (the one preprocessing); an image that
cannot be read is reported and the others are explained. Every file is written atomically.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zoo.errors import ImageError
from zoo.explain.maps import Explainer, Explanation, resolve_target
from zoo.explain.render import colour_map, overlay, png_bytes
from zoo.io import atomic_write_bytes, write_json
from zoo.postprocess import top_classes
from zoo.preprocess import load_image

SUMMARY = "explanations.json"
HEATMAP_SUFFIX = ".heatmap.png"
OVERLAY_SUFFIX = ".overlay.png"


@dataclass
class ExplainedImage:
    """One image: what the model answered, which class the pictures explain, where they are."""

    source: str
    heatmap: str | None = None
    overlay: str | None = None
    predicted: dict[str, Any] | None = None  # {"class", "label", "prob"}
    explained: dict[str, Any] | None = None  # the class the maps explain
    top: list[dict[str, Any]] = field(default_factory=list)
    in_distribution: bool | None = None  # filled once the card carries an OOD detector
    ood_score: float | None = None
    error: str = ""


@dataclass
class ExplainReport:
    """What ``zoo explain`` did."""

    bundle: str
    model: dict[str, str]  # id, weights_sha256, arch
    method: str
    layer: str | None
    feature_size: list[int] | None
    out: str
    images: list[ExplainedImage]
    note: str = ""  # a warning about the maps (Explanation.note)

    @property
    def failed(self) -> list[ExplainedImage]:
        return [im for im in self.images if im.error]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_stems(paths: Sequence[Path]) -> list[str]:
    """A distinct file stem per input (``a``, ``a-2`` … when two inputs share a name)."""
    seen: Counter[str] = Counter()
    stems = []
    for p in paths:
        seen[p.stem] += 1
        stems.append(p.stem if seen[p.stem] == 1 else f"{p.stem}-{seen[p.stem]}")
    return stems


def _read(paths: Sequence[Path], prep: Any) -> tuple[list[int], list[np.ndarray], dict[int, str]]:
    """Decode every image; the indices of the good ones, their arrays, and why the others failed."""
    good: list[int] = []
    arrays: list[np.ndarray] = []
    errors: dict[int, str] = {}
    for i, p in enumerate(paths):
        if not p.is_file():
            errors[i] = "no such file" if not p.exists() else "not a file"
            continue
        try:
            arrays.append(load_image(p, prep))
            good.append(i)
        except ImageError as e:
            errors[i] = str(e)
    return good, arrays, errors


def _class(probs: np.ndarray, labels: Sequence[str], c: int) -> dict[str, Any]:
    return {"class": int(c), "label": labels[int(c)], "prob": float(probs[int(c)])}


def describe_image(exp: Explanation, n: int, source: str, labels: Sequence[str], top_k: int) -> ExplainedImage:
    """The answer for image ``n`` of ``exp`` (without its pictures)."""
    pred = exp.predictions
    probs = pred.probs[n]
    item = ExplainedImage(source=source, predicted=_class(probs, labels, pred.classes[n]),
                          explained=_class(probs, labels, exp.targets[n]), top=top_classes(probs, labels, top_k))
    if pred.in_distribution is not None:
        item.in_distribution = bool(pred.in_distribution[n])
    if pred.ood_score is not None:
        item.ood_score = float(pred.ood_score[n])
    return item


def explain_files(bundle: str | Path, images: Sequence[str | Path], out: str | Path, target: int | str | None = None,
                  store: Path | None = None, top_k: int = 3, device: str = "cpu") -> ExplainReport:
    """Explain image files with a bundle (path, id or task name) into ``out``."""
    from zoo.bundle import load_bundle
    from zoo.store import resolve_bundle

    path = resolve_bundle(bundle, store)
    loaded = load_bundle(path, device)
    explainer = Explainer.from_bundle(loaded)
    labels = loaded.labels
    target_index = resolve_target(target, labels)  # a wrong --target fails before any work
    paths = [Path(p) for p in images]
    good, arrays, errors = _read(paths, loaded.preprocessing)
    records = {i: ExplainedImage(source=str(paths[i]), error=msg) for i, msg in errors.items()}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    exp = explainer(np.stack(arrays), target_index) if arrays else None
    stems = output_stems(paths)
    for n, i in enumerate(good if exp is not None else []):
        item = describe_image(exp, n, str(paths[i]), labels, top_k)
        heat_file, over_file = out_dir / f"{stems[i]}{HEATMAP_SUFFIX}", out_dir / f"{stems[i]}{OVERLAY_SUFFIX}"
        atomic_write_bytes(heat_file, png_bytes(colour_map(exp.heatmaps[n])))
        atomic_write_bytes(over_file, png_bytes(overlay(arrays[n], exp.heatmaps[n])))
        item.heatmap, item.overlay = str(heat_file), str(over_file)
        records[i] = item
    report = ExplainReport(
        bundle=str(path), model={**loaded.card.identity(), "arch": loaded.card.arch}, method=explainer.method,
        layer=explainer.layer_path, feature_size=list(exp.feature_size) if exp and exp.feature_size else None,
        out=str(out_dir), images=[records[i] for i in range(len(paths))], note=exp.note if exp else "")
    write_json(out_dir / SUMMARY, report.to_dict())
    return report


__all__ = ["HEATMAP_SUFFIX", "OVERLAY_SUFFIX", "SUMMARY", "ExplainReport", "ExplainedImage", "describe_image",
           "explain_files", "output_stems"]

"""Robustness to acquisition artefacts: MedMNIST-C (Di Salvo et al. 2024, the ``medmnistc`` package).

MedMNIST-C defines, per MedMNIST dataset, the corruptions that occur in that modality (blur, noise,
JPEG, exposure …), each at five severities, and an AlexNet baseline per dataset to which a
model's balanced error is compared (BE, rBE). This module applies them to uint8 images
(reproducibly: each corruption × severity draws from its own seeded generators), and computes the
paper's numbers; :mod:`zoo.evaluate` runs the model.

* **Resolution.** The registry's severities are pixel sizes chosen for 224 × 224 images (its
  baselines were measured there): a motion blur of radius 17 px, a 10 px margin for a stain. An
  image of another size is resized to 224 px (bilinear), corrupted, and resized back (bilinear,
  antialiased), so a severity means the same fraction of the image whatever the bundle's size,
  and the overlays (bubbles, stains, characters) fit. The clean reference goes through the same
  resizes, so rBE measures the corruption, not the resizing.
* **Grey images** are corrupted as RGB and turned back to grey, as MedMNIST-C's own
  ``DatasetManager`` does.
* **Datasets MedMNIST-C does not define** (image folders, MNIST) get :data:`GENERIC`: the
  modality-independent corruptions with the severities MedMNIST-C gives them for DermaMNIST
  (photographs, the broadest set); they have no baseline, so no BE / rBE.
"""

from __future__ import annotations

import hashlib
import random
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

from zoo.card import RobustnessInfo, RobustnessRow
from zoo.errors import UsageError
from zoo.metrics import compute_metrics
from zoo.postprocess import Predictions
from zoo.trust.conformal import set_metrics

SEVERITIES = (1, 2, 3, 4, 5)
WORK_SIZE = 224  # the resolution MedMNIST-C's severities and baselines are defined at
SEED = 0
GENERIC_SOURCE = "dermamnist"
GENERIC = ("pixelate", "jpeg_compression", "gaussian_noise", "motion_blur", "brightness_up", "brightness_down",
           "contrast_up", "contrast_down")
BASELINE = ("AlexNet on MedMNIST-C's 224 px test sets (the baseline medmnistc 0.1.0 ships, its utils/baselines.py); "
            "BE = mean balanced error over the 5 severities / AlexNet's, rBE = (that − clean balanced error) / "
            "(AlexNet's − AlexNet's clean), as medmnistc/eval.py computes them")


class _NumpyCompat:
    """numpy for medmnistc's filter module, whose motion blur decodes ImageMagick's PNG with
    ``np.fromstring(bytes, uint8)``: NumPy 2.3 removed that binary mode (ValueError); ``frombuffer``
    reads the same bytes."""

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    @staticmethod
    def fromstring(data: bytes, dtype: Any = float) -> np.ndarray:
        return np.frombuffer(data, dtype)


def registry() -> dict[str, dict[str, Any]]:
    """medmnistc's ``CORRUPTIONS_DS`` (imported here: it loads OpenCV and ImageMagick), with the shim above."""
    import medmnistc.corruptions.filter as mc_filter
    from medmnistc.corruptions.registry import CORRUPTIONS_DS

    mc_filter.np = _NumpyCompat()
    return CORRUPTIONS_DS


def corruption_set(dataset: str) -> tuple[dict[str, Any], str]:
    """The corruptions of a (canonical) dataset name, and a sentence saying where they come from."""
    reg = registry()
    if dataset in reg:
        return dict(reg[dataset]), f"MedMNIST-C's corruptions for {dataset} (medmnistc CORRUPTIONS_DS)"
    generic = {name: reg[GENERIC_SOURCE][name] for name in GENERIC}
    return generic, (f"{dataset} is not in MedMNIST-C: medzoo's generic set ({', '.join(GENERIC)}) at the severities "
                     f"MedMNIST-C gives them for {GENERIC_SOURCE}")


def baseline(dataset: str) -> dict[str, Any] | None:
    """MedMNIST-C's AlexNet balanced errors for a dataset (``clean_score``, ``raw_scores``), or None."""
    from medmnistc.utils.baselines import BASELINES

    return BASELINES.get(dataset)


def parse_severities(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """``"1-5"``, ``"3"``, ``"1,3,5"`` (or a list) → sorted severities within 1..5."""
    if text is None:
        return SEVERITIES
    try:
        if isinstance(text, str):
            out: set[int] = set()
            for part in text.replace(" ", "").split(","):
                lo, sep, hi = part.partition("-")
                out.update(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        else:
            out = {int(s) for s in text}
    except ValueError:
        raise UsageError(f"--severities takes severities 1 to 5 like 1-5, 3 or 1,3,5, not {text!r}") from None
    if not out or not out <= set(SEVERITIES):
        raise UsageError(f"--severities takes severities 1 to 5 like 1-5, 3 or 1,3,5, not {text!r}")
    return tuple(sorted(out))


@contextmanager
def seeded(seed: int) -> Iterator[np.random.Generator]:
    """medmnistc draws from numpy's and Python's global generators: seed both, and give them back
    as they were afterwards (the caller's streams are not disturbed); yields a generator for
    skimage's ``random_noise`` (``ImpulseNoise.rng``)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield np.random.default_rng(seed)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def condition_seed(corruption: str, severity: int, seed: int = SEED) -> int:
    """The seed of one corruption × severity (stable across runs and Python processes)."""
    return zlib.crc32(f"{corruption}:{severity}".encode()) + seed


def _to_work(img: np.ndarray) -> Image.Image:
    """(C, H, W) uint8 → an RGB PIL image at :data:`WORK_SIZE`."""
    pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
    if pil.size != (WORK_SIZE, WORK_SIZE):
        pil = pil.resize((WORK_SIZE, WORK_SIZE), Image.BILINEAR)
    return pil.convert("RGB")


def _from_work(out: Any, channels: int, size: int) -> np.ndarray:
    """A corrupted RGB image back to (C, size, size) uint8."""
    pil = Image.fromarray(np.asarray(out, dtype=np.uint8))
    pil = pil.convert("L" if channels == 1 else "RGB")
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BILINEAR)
    arr = np.asarray(pil, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def corrupt(images: np.ndarray, corruption: Any, severity: int | None, seed: int) -> np.ndarray:
    """(N, C, H, W) uint8 images through one medmnistc corruption at ``severity`` (1..5), or drawn
    as its augmentation does when ``severity`` is None; ``corruption`` None: the resizes alone."""
    images = np.asarray(images, dtype=np.uint8)
    out = np.empty_like(images)
    with seeded(seed) as rng:
        if corruption is not None and hasattr(corruption, "severity_params"):
            corruption.rng = rng  # ImpulseNoise reads it (medmnistc's DatasetManager sets it the same way)
        for i, img in enumerate(images):
            work = _to_work(img)
            if corruption is None:
                res: Any = work
            elif severity is None:
                res = corruption.apply(work, augmentation=True)
            else:
                res = corruption.apply(work, severity - 1)
            out[i] = _from_work(res, images.shape[1], images.shape[-1])
    return out


_CACHE: dict[tuple[Any, ...], np.ndarray] = {}


def corrupted(images: np.ndarray, name: str, corruption: Any, severity: int, seed: int = SEED) -> np.ndarray:
    """:func:`corrupt` at :func:`condition_seed`, kept in memory for the last image set seen: the
    corrupted images do not depend on the model, so evaluating several bundles of one dataset in a
    process (a benchmark, a re-run) corrupts them once (ImageMagick's motion blur takes ~50 ms an image)."""
    data = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest() + str(images.shape)
    if any(key[0] != data for key in _CACHE):
        _CACHE.clear()
    key = (data, name, severity, seed)
    if key not in _CACHE:
        _CACHE[key] = corrupt(images, corruption, severity, condition_seed(name, severity, seed))
    return _CACHE[key]


def augment_images(images: np.ndarray, corruptions: dict[str, Any], seed: int) -> np.ndarray:
    """MedMNIST-C's training augmentation (``AugMedMNISTC``): per image one corruption drawn
    uniformly among the set and the identity, at an intensity drawn between its mildest and
    harshest severity; at :data:`WORK_SIZE` like the evaluation."""
    from medmnistc.augmentation import AugMedMNISTC

    aug = AugMedMNISTC(corruptions)
    images = np.asarray(images, dtype=np.uint8)
    out = np.empty_like(images)
    with seeded(seed) as rng:
        for c in corruptions.values():
            c.rng = rng
        for i, img in enumerate(images):
            out[i] = _from_work(aug(_to_work(img)), images.shape[1], images.shape[-1])
    return out


def balanced_error(labels: np.ndarray, probs: np.ndarray, threshold: float | None) -> float:
    """MedMNIST-C's error: 1 − balanced accuracy; a binary task predicts class 1 when P(class 1) >
    ``threshold`` (medmnistc/eval.py), a multi-class task the most probable class."""
    labels = np.asarray(labels).reshape(-1)
    if probs.shape[1] == 2:
        pred = probs[:, 1] > (0.5 if threshold is None else threshold)
        return float(1.0 - balanced_accuracy_score(labels, pred.astype(np.int64)))
    return float(1.0 - balanced_accuracy_score(labels, probs.argmax(axis=1)))


def condition_metrics(labels: np.ndarray, answer: Predictions, label_names: list[str],
                      threshold: float | None) -> dict[str, float | None]:
    """ACC, AUC, balanced error, share flagged out of distribution, conformal coverage and set size."""
    m = compute_metrics(labels, answer.probs, label_names)
    out: dict[str, float | None] = {"acc": m["acc"], "auc": m["auc"],
                                    "balanced_error": balanced_error(labels, answer.probs, threshold),
                                    "ood_flagged": None, "coverage": None, "mean_set_size": None}
    if answer.in_distribution is not None:
        out["ood_flagged"] = float((~answer.in_distribution).mean())
    if answer.sets is not None:
        s = set_metrics(answer.sets, np.asarray(labels).reshape(-1).astype(np.int64))
        out["coverage"], out["mean_set_size"] = s["coverage"], s["mean_set_size"]
    return out


def summarise(dataset: str, clean: dict[str, Any], rows: list[RobustnessRow], **fields: Any) -> RobustnessInfo:
    """The card's ``robustness``: every row, and per corruption the paper's BE and rBE against the
    AlexNet baseline (only with all five severities, as the paper averages over them); ``fields``:
    the rest of :class:`~zoo.card.RobustnessInfo` (source, threshold, alpha …)."""
    base = baseline(dataset)
    errors: dict[str, list[float]] = {}
    for r in rows:
        errors.setdefault(r.corruption, []).append(r.balanced_error)
    be: dict[str, float] = {}
    rbe: dict[str, float] = {}
    complete = {r.severity for r in rows} == set(SEVERITIES)
    if base is not None and complete:
        b_clean = base["clean_score"]
        for name, errs in errors.items():
            b_err = base["raw_scores"].get(name)
            if b_err:
                be[name] = float(np.mean(errs) / b_err)
                rbe[name] = float((np.mean(errs) - clean["balanced_error"]) / (b_err - b_clean))
    summary = {f"mean_{k}": float(np.mean([r.model_dump()[k] for r in rows]))
               for k in ("acc", "auc", "balanced_error")}
    if be:
        summary.update(be=float(np.mean(list(be.values()))), rbe=float(np.mean(list(rbe.values()))))
    if base is None:
        note = f"no baseline: MedMNIST-C has none for {dataset}"
    elif not complete:
        note = "BE / rBE need all five severities; not computed"
    else:
        note = BASELINE
    return RobustnessInfo(baseline=note, clean=clean, rows=rows, be=be, rbe=rbe, summary=summary, **fields)


__all__ = ["BASELINE", "GENERIC", "SEED", "SEVERITIES", "WORK_SIZE", "augment_images", "balanced_error", "baseline",
           "condition_metrics", "condition_seed", "corrupt", "corrupted", "corruption_set", "parse_severities",
           "registry", "seeded", "summarise"]

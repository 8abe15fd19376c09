"""The Python API: a trained model in one call, answers per image in another.

    import zoo

    model = zoo.load("skin")                    # best skin bundle of the store, on ONNX Runtime
    answers = model.predict(["lesion.png", "scan.dcm", pil_image, uint8_array])
    answers[0].label, answers[0].prob, answers[0].top   # one Prediction per image, in order

:func:`load` takes a task or dataset name (its best bundle by validation metrics), a bundle id, a
bundle directory or a ``.onnx`` file exported by ``zoo export``; a list of them, or a task with
``ensemble=True``, gives an :class:`Ensemble` (:mod:`zoo.ensemble`: the members, checks and
combination of ``/pathology_ensemble`` and ``zoo score --ensemble``). Models run on ONNX Runtime
(a bundle without ``model.onnx`` is exported first, parity-checked) or, with ``backend="torch"``,
on PyTorch: the bundle's ``torch.export`` program (``model.pt2``, written by ``zoo export --format
pt2``: sha256 and archive checked, parity-checked at export) when it has one, else the network
rebuilt from its safetensors weights.

Images are decoded by :func:`zoo.preprocess.load_image` — ``model.transforms()`` is that function
bound to the model's preprocessing — and answers follow :mod:`zoo.postprocess` (probabilities,
predicted class, calibration and out-of-distribution fields when the card carries them): the same
numbers as the service and ``zoo score`` for the same files.

Importing this module does not import torch; ``backend="torch"`` and exporting do, when used.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from zoo.card import ONNX_FILE, PT2_FILE, Card, ExportMeta, ModelInfo, read_card
from zoo.ensemble import EnsemblePredictions, check_compatible, combine, ensemble_conformal, resolve_models
from zoo.errors import ImageError, ModelFileError, UsageError
from zoo.postprocess import Predictions, check_alpha, interpret, top_classes
from zoo.preprocess import MAX_PIXELS, ImageSource, ImageTransform, Preprocessing, Window
from zoo.runtime import OnnxModel, RuntimeOptions, bundle_card
from zoo.settings import runtime_options
from zoo.store import ModelRef

Backend = Literal["onnx", "torch"]  # the engine a Model runs on (ONNX Runtime or PyTorch)
DEFAULT_TOP_K = 3  # as the service
DEFAULT_BATCH = 64


@dataclass(frozen=True)
class ClassScore:
    """One class and its probability."""

    index: int
    label: str
    prob: float


@dataclass(frozen=True, eq=False)
class Prediction:
    """What a model says about one image.

    ``label`` / ``index`` / ``prob``: the predicted class and its probability; ``probs``: every
    class's probability (``float32 (K,)``, in the order of ``Model.labels``); ``top``: the
    ``top_k`` most probable classes, best first. ``calibrated``, ``ood_score`` and
    ``in_distribution`` come from the card (calibration, out-of-distribution detector) and are
    ``False`` / ``None`` until it carries them; ``agreement`` is, for an ensemble, the fraction of
    members whose own answer is the ensemble's. ``prediction_set``: the classes plausible at level
    1 − ``alpha`` (split conformal prediction: the true class is in it for at least that share of
    images like the validation split's), most probable first; ``None`` until the card carries
    conformal scores (``zoo calibrate``).
    """

    label: str
    index: int
    prob: float
    probs: np.ndarray = field(repr=False)
    top: tuple[ClassScore, ...]
    calibrated: bool = False
    ood_score: float | None = None
    in_distribution: bool | None = None
    agreement: float | None = None
    prediction_set: tuple[str, ...] | None = None
    alpha: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the shape of one image's answer in the service)."""
        out: dict[str, Any] = {"label": self.label, "class": self.index, "prob": self.prob,
                               "top": [{"class": c.index, "label": c.label, "prob": c.prob} for c in self.top],
                               "calibrated": self.calibrated}
        for name in ("ood_score", "in_distribution", "agreement", "prediction_set", "alpha"):
            if getattr(self, name) is not None:
                out[name] = list(self.prediction_set) if name == "prediction_set" else getattr(self, name)
        return out


def _predictions(answer: Predictions, labels: Sequence[str], top_k: int) -> list[Prediction]:
    """One :class:`Prediction` per image of a batch's :class:`~zoo.postprocess.Predictions` (an
    ensemble's :class:`~zoo.ensemble.EnsemblePredictions` adds the members' agreement)."""
    agreement = answer.agreement if isinstance(answer, EnsemblePredictions) else None
    out = []
    for n in range(len(answer)):
        probs = answer.probs[n]
        k = int(answer.classes[n])
        top = tuple(ClassScore(t["class"], t["label"], t["prob"]) for t in top_classes(probs, labels, top_k))
        plausible = answer.prediction_set(n, labels)
        out.append(Prediction(
            label=labels[k], index=k, prob=float(probs[k]), probs=probs, top=top, calibrated=answer.calibrated,
            ood_score=None if answer.ood_score is None else float(answer.ood_score[n]),
            in_distribution=None if answer.in_distribution is None else bool(answer.in_distribution[n]),
            agreement=None if agreement is None else float(agreement[n]),
            prediction_set=None if plausible is None else tuple(plausible), alpha=answer.alpha,
        ))
    return out


def _items(images: Any) -> list[Any]:
    """The images of a ``predict`` call: a list / tuple, a 4-D array (a batch), or one image."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]


def _name(item: Any, i: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return f"{os.fspath(item)!s}"
    return f"image {i}"


class _Predictor(ABC):
    """What a single model and an ensemble share: preprocessing, decoding, batching."""

    labels: list[str]
    preprocessing: Preprocessing
    window: Window | None
    max_pixels: int

    def transforms(self) -> ImageTransform:
        """The preprocessing as a callable: image (path, bytes, ``PIL.Image``, array, DICOM) →
        ``uint8 (C, H, W)`` array at the model's image size, as the model takes it (like
        torchvision's ``weights.transforms()``). It is :func:`zoo.preprocess.load_image`, not a copy."""
        return ImageTransform(self.preprocessing, self.max_pixels, self.window)

    def decode(self, images: Any) -> np.ndarray:
        """Decode images into the uint8 batch ``(N, C, H, W)`` the model takes. A refused image
        raises :class:`~zoo.errors.ImageError` naming it (file name or position)."""
        transform = self.transforms()
        arrays = []
        for i, item in enumerate(_items(images)):
            try:
                arrays.append(transform(item))
            except ImageError as e:
                raise ImageError(f"{_name(item, i)}: {e}", e.kind) from e
        c, s = self.preprocessing.in_channels, self.preprocessing.image_size
        return np.stack(arrays) if arrays else np.zeros((0, c, s, s), np.uint8)

    def predict(self, images: ImageSource | Sequence[ImageSource], top_k: int = DEFAULT_TOP_K,
                batch_size: int = DEFAULT_BATCH, alpha: float | None = None) -> list[Prediction]:
        """One :class:`Prediction` per image, in order (a list also for a single image).

        ``images``: a path, bytes, a binary file, a ``PIL.Image``, a pydicom ``Dataset``, a numpy
        image (``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``; any size), a list of those, or a 4-D
        array (a batch). DICOM files are read with their rescale and window. ``alpha``: the level of
        the prediction sets, 1 − ``alpha`` (default: the card's, 0.1).
        """
        if top_k < 1:
            raise UsageError(f"top_k must be at least 1, not {top_k}")
        alpha = check_alpha(alpha)
        if batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, not {batch_size}")
        batch = self.decode(images)
        answers: list[Prediction] = []
        for start in range(0, len(batch), batch_size):
            answers += self._answer(batch[start : start + batch_size], top_k, alpha)
        return answers

    __call__ = predict

    @abstractmethod
    def _answer(self, batch: np.ndarray, top_k: int, alpha: float | None) -> list[Prediction]:
        """The answers for one batch of uint8 images (N, C, H, W), sets at level 1 − ``alpha``."""


class Model(_Predictor):
    """One trained classifier, loaded by :func:`load`.

    ``card``: the bundle's typed :class:`~zoo.card.Card` (for a lone ``.onnx`` file, the
    :class:`~zoo.card.ExportMeta` it carries); ``info``: the :class:`~zoo.card.ModelInfo` every
    answer relies on (id, labels, preprocessing, weights hash); ``backend``: ``"onnx"`` or
    ``"torch"``; ``provider``: where it runs (ONNX Runtime's provider, or the torch device).
    """

    def __init__(self, card: Card | ExportMeta, run: Callable[[np.ndarray], dict[str, np.ndarray]], backend: Backend,
                 path: Path, provider: str, window: Window | None = None, max_pixels: int = MAX_PIXELS) -> None:
        self.card, self.backend, self.path, self.provider = card, backend, path, provider
        self.labels = list(card.labels)
        self.preprocessing = card.preprocessing
        self.window, self.max_pixels = window, max_pixels
        self._run = run

    @property
    def info(self) -> ModelInfo:
        return ModelInfo.model_validate({k: getattr(self.card, k) for k in ModelInfo.model_fields})

    @property
    def id(self) -> str:
        return self.card.id

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """``logits`` ``(N, K')`` (raw) and, with a detector, ``ood_score`` ``(N,)`` for a decoded uint8
        batch ``(N, C, H, W)`` (see :meth:`decode`)."""
        batch = np.ascontiguousarray(batch)
        if batch.dtype != np.uint8 or batch.shape[1:] != self.preprocessing.shape:
            shape = ", ".join(map(str, self.preprocessing.shape))
            raise UsageError(f"{self.id} takes uint8 batches of shape (N, {shape}), not {batch.dtype} {batch.shape}; "
                             "decode images with model.decode() or model.transforms()")
        return {k: np.asarray(v, dtype=np.float32) for k, v in self._run(batch).items()}

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits ``(N, K')`` for a decoded uint8 batch ``(N, C, H, W)``."""
        return self.outputs(batch)["logits"]

    def _answer(self, batch: np.ndarray, top_k: int, alpha: float | None) -> list[Prediction]:
        out = self.outputs(batch)
        return _predictions(interpret(out["logits"], self.card, out.get("ood_score"), alpha), self.labels, top_k)

    def __repr__(self) -> str:
        p = self.preprocessing
        return (f"Model({self.id!r}, arch={self.card.arch!r}, labels={len(self.labels)}, input=uint8 "
                f"{p.in_channels}x{p.image_size}x{p.image_size}, backend={self.backend!r} on {self.provider})")


class Ensemble(_Predictor):
    """Several models of one task answering together (:func:`zoo.ensemble.combine`: the mean of
    their logits, then the one probability rule); each answer carries the members' ``agreement``."""

    def __init__(self, members: Sequence[Model]) -> None:
        check_compatible([m.card for m in members])
        self.members = list(members)
        first = self.members[0]
        self.labels, self.preprocessing = first.labels, first.preprocessing
        self.window, self.max_pixels = first.window, first.max_pixels
        # the sets of the ensemble's own calibrated probabilities on the members' validation split
        self.conformal = ensemble_conformal([m.path for m in self.members], self.cards)

    @property
    def cards(self) -> list[Card | ExportMeta]:
        return [m.card for m in self.members]

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.members]

    def _answer(self, batch: np.ndarray, top_k: int, alpha: float | None) -> list[Prediction]:
        outs = [m.outputs(batch) for m in self.members]
        answer = combine([o["logits"] for o in outs], self.cards, [o.get("ood_score") for o in outs],
                         self.conformal, alpha)
        return _predictions(answer, self.labels, top_k)

    def __repr__(self) -> str:
        return f"Ensemble({self.ids}, combine='mean of logits', backend={self.members[0].backend!r})"


# ---------------------------------------------------------------------------------------------
# loading


def _onnx_model(target: Path, options: RuntimeOptions, window: Window | None, max_pixels: int) -> Model:
    if target.is_dir() and not (target / ONNX_FILE).is_file():
        # torch is imported only here, when a bundle has no ONNX file yet
        from export.exporter import ensure_exported

        ensure_exported(target, ("onnx",), options=options)
    onnx = OnnxModel.open(target, options)  # verified against the card
    card: Card | ExportMeta = read_card(target) if target.is_dir() else (bundle_card(onnx.path) or onnx.meta)
    return Model(card, onnx.outputs, "onnx", onnx.path, onnx.provider, window, max_pixels)


def _torch_model(target: Path, device: str | None, window: Window | None, max_pixels: int) -> Model:
    if not target.is_dir():
        raise ModelFileError(f"{target} is a lone ONNX file: backend='torch' needs a bundle (its safetensors "
                             "weights); use backend='onnx'")
    import torch

    from zoo.bundle import load_bundle
    from zoo.inference import pick_device, predict_logits

    dev = pick_device(device)
    if (target / PT2_FILE).is_file():
        # the exported program: what `zoo export --format pt2` checked against the eager network, and what
        # a deployment without medzoo's model code runs (torch is imported only here)
        from export.pt2_export import load_pt2

        program = load_pt2(target, dev)
        return Model(read_card(target), program.outputs, "torch", target, program.provider, window, max_pixels)
    bundle = load_bundle(target, dev)

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(batch)
        if bundle.scored is None:
            return {"logits": predict_logits(bundle.model, x, batch_size=len(batch), device=dev).numpy()}
        with torch.no_grad():
            logits, score = bundle.scored(x.to(dev))
        return {"logits": logits.float().cpu().numpy(), "ood_score": score.float().cpu().numpy()}

    return Model(bundle.card, run, "torch", target, str(dev), window, max_pixels)


def load(
    model: ModelRef | Sequence[ModelRef],
    *,
    backend: Backend = "onnx",
    ensemble: bool = False,
    ensemble_size: int | None = None,
    arch: str | None = None,
    store: str | os.PathLike[str] | None = None,
    options: RuntimeOptions | None = None,
    device: str | None = None,
    window: Window | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Model | Ensemble:
    """Load a trained model (or an ensemble) for prediction.

    ``model``: a task or dataset name (``"skin"``, ``"organ"``, ``"pathology"``, ``"breast"``, …:
    its best bundle by validation metrics), a bundle id, a bundle directory, or a ``.onnx`` file;
    a list of them is an ensemble. ``ensemble=True`` with a task: its best ``ensemble_size``
    (default: all) bundles of one architecture (``arch``, default that of its best bundle).
    ``backend``: ``"onnx"`` (ONNX Runtime made with ``options``, default
    :func:`zoo.settings.runtime_options`: the best provider present, ``$MEDZOO_PROVIDERS`` … read
    once here; a bundle without ``model.onnx`` is exported first) or ``"torch"`` (on ``device``,
    default CUDA when present, else the CPU: the bundle's ``model.pt2`` when it has one, else its
    network from the safetensors weights). A list naming the same model twice is refused
    (:func:`zoo.ensemble.resolve_models`, as ``zoo score``). ``store``: the medzoo home holding ``bundles/`` (default
    ``$MEDZOO_HOME``). ``window``: ``(center, width)`` applied to DICOM grey images (e.g. a CT
    window in HU) instead of the file's own; ``max_pixels``: the largest image accepted.
    """
    if backend not in ("onnx", "torch"):
        raise UsageError(f"backend must be 'onnx' or 'torch', not {backend!r}")
    root = Path(store).expanduser() if store is not None else None
    ort_options = runtime_options() if options is None and backend == "onnx" else options

    def one(target: Path) -> Model:
        if backend == "torch":
            return _torch_model(target, device, window, max_pixels)
        assert ort_options is not None
        return _onnx_model(target, ort_options, window, max_pixels)

    refs = list(model) if isinstance(model, (list, tuple)) else [model]
    targets = resolve_models(refs, ensemble, ensemble_size, arch, root)
    if len(targets) == 1:
        return one(targets[0])
    return Ensemble([one(t) for t in targets])


__all__ = ["Backend", "ClassScore", "Ensemble", "Model", "Prediction", "load"]

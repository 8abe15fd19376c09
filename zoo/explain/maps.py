"""Heat maps of where a model looked: Grad-CAM (pytorch-grad-cam) for convolutional networks at the
layer the registry names, gradient saliency (Captum) for networks without a feature map (MLPs).

The model explained is the served one, ``Sequential(InputAdapter, net)``, fed the uint8 images
as floats in [0, 1] (the adapter takes both): the maps are computed through the model's own
preprocessing and come out at the image size, aligned with the pixels the user gave.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from zoo.card import ModelInfo
from zoo.errors import ExplainError
from zoo.explain.layers import resolve_layer
from zoo.models import get_spec
from zoo.postprocess import Predictions, class_index, interpret

GRAD_CAM = "grad-cam"
SALIENCY = "saliency"
CHUNK = 32  # images per backward pass: bounds the memory the activations and gradients take
SALIENCY_PERCENTILE = 98.0  # Captum's visualisation default (outlier_perc=2)


class BinaryLogitTarget:
    """The score of class ``category`` for a single-logit head (BCE / hinge): ``z`` for class 1,
    ``-z`` for class 0, since ``z = log(p1 / p0)``. pytorch-grad-cam's ``ClassifierOutputTarget(0)``
    would read ``z`` itself, i.e. explain class 1 whatever class was asked for."""

    def __init__(self, category: int) -> None:
        if category not in (0, 1):
            raise ExplainError(f"a single-logit model has classes 0 and 1, not {category}")
        self.category = category

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        z = model_output[..., 0]
        return z if self.category == 1 else -z


def class_target(num_outputs: int, category: int) -> Any:
    """The pytorch-grad-cam target that scores ``category`` for a head of ``num_outputs`` logits."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return BinaryLogitTarget(category) if num_outputs == 1 else ClassifierOutputTarget(category)


def resolve_target(target: int | str | None, labels: Sequence[str]) -> int | None:
    """The class to explain: None (the predicted one) or :func:`zoo.postprocess.class_index`."""
    return None if target is None else class_index(target, labels)


@dataclass
class Explanation:
    """Maps of N images: ``heatmaps[i]`` (H, W) in [0, 1] at the image size, explaining
    ``targets[i]``; ``predictions`` is the model's answer (:func:`zoo.postprocess.interpret`)."""

    heatmaps: np.ndarray  # (N, H, W) float32
    targets: np.ndarray  # (N,) int64
    predictions: Predictions
    method: str  # GRAD_CAM or SALIENCY
    layer: str | None  # the registry's cam_layer (None for saliency)
    feature_size: tuple[int, int] | None  # resolution of the map before upsampling (None: per pixel)
    logits: np.ndarray | None = None  # (N, K') the model's raw outputs

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def note(self) -> str:
        """A warning for whoever reads the maps ('' when there is none)."""
        if self.feature_size is not None and min(self.feature_size) == 1:
            h, w = self.feature_size
            return (f"the feature map at {self.layer!r} is {h}x{w} at this input size: Grad-CAM cannot localise "
                    "(the map is flat); a model trained at a larger input size (ResNets: or with stem 'small') can")
        return ""


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter gradients while explaining (only activations' and inputs' are needed); the
    model's own ``requires_grad`` flags are restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _scale_saliency(maps: np.ndarray) -> np.ndarray:
    """Per image: divided by its 98th percentile and clipped, so a few extreme pixels do not
    leave the rest black (Captum's ``visualize_image_attr`` does the same)."""
    out = np.zeros_like(maps, dtype=np.float32)
    for i, m in enumerate(maps):
        top = float(np.percentile(m, SALIENCY_PERCENTILE))
        if top <= 0:
            top = float(m.max())
        if top > 0:
            out[i] = np.clip(m / top, 0.0, 1.0)
    return out


class Explainer:
    """Explains one model, ``Sequential(InputAdapter, net)`` with the card ``info``: Grad-CAM at
    the registry's ``cam_layer`` of ``info.arch`` inside ``net``, gradient saliency when it is None.
    Its answer is the served one (:func:`zoo.postprocess.interpret`: calibrated probabilities and the
    out-of-distribution flag when the card has them). Calls are serialised (Grad-CAM hooks the
    layer for the duration of a call)."""

    def __init__(self, model: nn.Module, info: ModelInfo, scored: nn.Module | None = None) -> None:
        self.model = model.eval()
        self.info = info
        # ``(logits, ood_score)`` of the same model when its card carries an OOD detector (zoo.trust)
        self.scored = scored.eval() if scored is not None else None
        self.layer_path = get_spec(info.arch).cam_layer
        net = model[1] if isinstance(model, nn.Sequential) and len(model) == 2 else model
        self.layer = resolve_layer(net, self.layer_path) if self.layer_path is not None else None
        self.method = GRAD_CAM if self.layer is not None else SALIENCY
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, bundle: Any) -> Explainer:
        """For a loaded :class:`zoo.bundle.Bundle`."""
        return cls(bundle.model, bundle.card, getattr(bundle, "scored", None))

    @classmethod
    def load(cls, path: Any, device: str = "cpu") -> Explainer:
        """For the bundle at ``path`` (loaded and verified by :func:`zoo.bundle.load_bundle`)."""
        from zoo.bundle import load_bundle

        return cls.from_bundle(load_bundle(path, device))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def targets_for(self, logits: np.ndarray, target: int | str | Sequence[int] | None) -> np.ndarray:
        """The class explained for each image: the predicted one, ``target`` (index or label) for
        all, or one per image."""
        n = len(logits)
        if target is None:
            return interpret(logits, self.info).classes
        if isinstance(target, (int, str, np.integer)):
            return np.full(n, class_index(target, self.info.labels), dtype=np.int64)
        if len(target) != n:
            raise ExplainError(f"{len(target)} target classes for {n} images")
        return np.array([class_index(t, self.info.labels) for t in target], dtype=np.int64)

    def _tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, C, H, W) at the model's image size → floats in [0, 1] on the model's device."""
        prep = self.info.preprocessing
        images = np.asarray(images)
        expected = (prep.in_channels, prep.image_size, prep.image_size)
        if images.ndim != 4 or images.dtype != np.uint8 or tuple(images.shape[1:]) != expected or not len(images):
            raise ExplainError(f"images must be uint8 (N, {', '.join(map(str, expected))}), "
                               f"not {images.dtype} {tuple(images.shape)}")
        return torch.from_numpy(images).to(self.device).float().div_(255.0)

    def _forward(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (N, K') and, with a detector, the OOD scores (N,)."""
        with self._lock, torch.no_grad():
            if self.scored is None:
                return self.model(x).float().cpu().numpy(), None
            logits, ood = self.scored(x)
            return logits.float().cpu().numpy(), ood.float().cpu().numpy().reshape(-1)

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The model's logits (N, K') for uint8 images (N, C, H, W), and its OOD scores (N,) when
        the card carries a detector (else None)."""
        return self._forward(self._tensor(images))

    def logits(self, images: np.ndarray) -> np.ndarray:
        """The model's logits (N, K') for uint8 images (N, C, H, W)."""
        return self.outputs(images)[0]

    def __call__(self, images: np.ndarray, target: int | str | Sequence[int] | None = None) -> Explanation:
        """Explain uint8 images (N, C, H, W) at the model's image size: the predicted class of
        each, or ``target`` (an index or label for all, or one index per image)."""
        x = self._tensor(images)
        logits, ood = self._forward(x)
        targets = self.targets_for(logits, target)
        maps, feature = [], None
        with self._lock, _frozen(self.model):
            for start in range(0, len(x), CHUNK):
                part, feature = self._maps(x[start:start + CHUNK], targets[start:start + CHUNK].tolist())
                maps.append(part)
        return Explanation(heatmaps=np.concatenate(maps).astype(np.float32), targets=targets,
                           predictions=interpret(logits, self.info, ood), method=self.method, layer=self.layer_path,
                           feature_size=feature, logits=logits)

    def _maps(self, x: torch.Tensor, targets: list[int]) -> tuple[np.ndarray, tuple[int, int] | None]:
        if self.method == GRAD_CAM:
            return self._grad_cam(x, targets)
        return self._saliency(x, targets), None

    def _grad_cam(self, x: torch.Tensor, targets: list[int]) -> tuple[np.ndarray, tuple[int, int]]:
        from pytorch_grad_cam import GradCAM

        scores = [class_target(self.info.num_outputs, t) for t in targets]
        cam = GradCAM(model=self.model, target_layers=[self.layer])
        # The input requires grad, so the graph reaches the layer even when every parameter before
        # it is frozen (resnet50_tl's backbone, and _frozen above).
        cam.compute_input_gradient = True
        # Not `with GradCAM(...)`: its __exit__ swallows IndexError (and prints it).
        try:
            maps = cam(input_tensor=x, targets=scores)
            h, w = cam.activations_and_grads.activations[0].shape[-2:]
        except ValueError as e:  # the library's "Invalid activation shape"
            shapes = [tuple(a.shape) for a in cam.activations_and_grads.activations]
            raise ExplainError(f"cam_layer {self.layer_path!r} of {self.info.arch} gives {shapes}, not a "
                               f"(N, C, H, W) feature map: {e}") from None
        finally:
            cam.activations_and_grads.release()
        return np.asarray(maps, dtype=np.float32), (int(h), int(w))

    def _saliency(self, x: torch.Tensor, targets: list[int]) -> np.ndarray:
        from captum.attr import Saliency

        def scores(inputs: torch.Tensor) -> torch.Tensor:
            z = self.model(inputs)
            # a single logit z is the two-class score (-z, z) (see BinaryLogitTarget)
            return torch.cat([-z, z], dim=1) if self.info.num_outputs == 1 else z

        grads = Saliency(scores).attribute(x.clone().requires_grad_(True), target=targets, abs=True)
        # Simonyan et al. (2014): the largest absolute gradient over the colour channels
        return _scale_saliency(grads.amax(dim=1).detach().cpu().numpy())


__all__ = ["GRAD_CAM", "SALIENCY", "BinaryLogitTarget", "Explainer", "Explanation", "class_target",
           "resolve_target"]

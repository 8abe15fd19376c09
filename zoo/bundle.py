"""The checkpoint bundle: one directory per checkpoint, defined here and nowhere else.

Layout::

    <bundle>/
      model.safetensors      the network's state dict (safetensors: loading never unpickles)
      card.json              what the checkpoint is (:class:`zoo.card.Card`, typed and validated)
      README.md              the Markdown model card (:mod:`zoo.modelcard`, ``zoo card``)
      recipe.yaml            the resolved recipe it was trained with
      curves.png             training curves
      confusion.png          test confusion matrix
      model.onnx, model.fp16.onnx, model.torchscript.pt   added by ``zoo export``

The card's reading and writing (no torch) is :mod:`zoo.card`; this module adds the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from zoo.card import CARD, RECIPE, WEIGHTS, Card, parse_card, read_card, write_card
from zoo.errors import BundleError
from zoo.io import atomic_file, atomic_write_bytes, sha256_of
from zoo.preprocess.adapter import full_model


@dataclass
class Bundle:
    """A loaded, verified checkpoint. ``model`` is eval-mode ``Sequential(InputAdapter, net)``
    (``net`` wrapped in :class:`~zoo.preprocess.adapter.FlipTTA` when the card has ``tta``)."""

    path: Path
    card: Card
    net: nn.Module
    model: nn.Module
    # ``(logits, ood_score)`` when the card carries an out-of-distribution detector: what is exported
    scored: nn.Module | None = None

    @property
    def exported_model(self) -> nn.Module:
        """The module every export is made from (with the detector's output when there is one)."""
        return self.scored if self.scored is not None else self.model

    @property
    def preprocessing(self) -> Any:
        return self.card.preprocessing

    @property
    def labels(self) -> list[str]:
        return list(self.card.labels)

    @property
    def id(self) -> str:
        return self.card.id


def reserve_dir(parent: Path, name: str) -> Path:
    """Create ``parent/name`` (or ``name-2``, ``name-3`` … when taken) atomically; two runs that
    finish at once never write into the same bundle."""
    parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        path = parent / (name if k == 1 else f"{name}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise BundleError(f"cannot create a bundle directory for {name} in {parent}")


WEIGHT_BOUND = ("calibration", "ood", "exports")  # card sections that belong to one set of weights


def save_bundle(path: Path, net: nn.Module, card: dict[str, Any] | Card, recipe_yaml: str) -> Path:
    """Write weights, recipe and card (card last: a directory without one is not a bundle);
    fills ``weights_sha256``, ``schema`` and ``id`` (the directory name) in the card and drops
    the sections fitted on other weights (:data:`WEIGHT_BOUND`)."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_file(path / WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    raw = card.to_json_dict() if isinstance(card, Card) else dict(card)
    # what was fitted or exported from other weights does not describe these ones
    for key in WEIGHT_BOUND:
        raw.pop(key, None)
    raw.update({"schema": 1, "id": path.name, "weights_sha256": sha256_of(path / WEIGHTS)})
    typed = parse_card(raw, path / CARD)
    atomic_write_bytes(path / RECIPE, recipe_yaml.encode())
    write_card(path, typed)
    return path


def verify_weights(path: str | Path, card: Card) -> None:
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise BundleError(f"{path} has no {WEIGHTS}")
    digest = sha256_of(weights)
    if digest != card.weights_sha256:
        raise BundleError(
            f"{weights} does not match its card (sha256 {digest[:12]}…, card says "
            f"{card.weights_sha256[:12]}…): the weights were altered; refusing to load"
        )


def build_net(card: Card) -> nn.Module:
    """An untrained network of the card's architecture (no pretrained download)."""
    from zoo.models import create_model

    prep = card.preprocessing
    return create_model(
        card.arch, num_classes=card.num_outputs, in_channels=prep.in_channels,
        input_size=prep.input_size, pretrained=False, **dict(card.model_kwargs),
    )


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load and verify a bundle (sha256 of the weights against the card; safetensors only)."""
    p = Path(path)
    card = read_card(p)
    verify_weights(p, card)
    net = build_net(card)
    try:
        state = load_file(str(p / WEIGHTS), device=str(device))
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{p / WEIGHTS} cannot be read: {e}") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{p / WEIGHTS} does not fit {card.arch}: {str(e)[:200]}") from None
    model = full_model(net, card.preprocessing, card.tta).to(device).eval()
    return Bundle(path=p, card=card, net=net, model=model, scored=_scored(p, card, model, net, device))


def _scored(path: Path, card: Card, model: nn.Module, net: nn.Module, device: str | torch.device) -> nn.Module | None:
    """``ScoredModel`` of a bundle with a detector, its statistics verified against the card."""
    info = card.ood
    if info is None:
        return None
    from zoo.trust.ood import OODScorer, ScoredModel, stats_from_tensors

    stats_path = path / info.stats_file
    if not stats_path.is_file() or sha256_of(stats_path) != info.stats_sha256:
        raise BundleError(f"{stats_path} is missing or does not match its card; run `zoo calibrate {path}`")
    stats = stats_from_tensors(load_file(str(stats_path)), len(info.layers))
    return ScoredModel(model, net, info.layers, OODScorer(stats)).to(device).eval()


__all__ = ["CARD", "RECIPE", "WEIGHTS", "Bundle", "build_net", "load_bundle", "reserve_dir", "save_bundle",
           "verify_weights"]

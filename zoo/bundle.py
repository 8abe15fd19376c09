"""The checkpoint bundle: one directory per checkpoint, defined here and nowhere else.

Layout::

    <bundle>/
      model.safetensors      the network's state dict (safetensors: loading never unpickles)
      card.json              what the checkpoint is (see ``Card keys`` below)
      recipe.yaml            the resolved recipe it was trained with
      curves.png             training curves
      confusion.png          test confusion matrix
      model.onnx, model.fp16.onnx, model.torchscript.pt   added by ``zoo export``

Card keys: ``schema``, ``id``, ``arch``, ``model_kwargs``, ``num_outputs``, ``task``,
``labels``, ``preprocessing`` (:class:`zoo.preprocess.Preprocessing`), ``dataset``
(name, checksum, sizes, split), ``recipe`` (resolved), ``metrics`` (``val``, ``test``),
``reported`` (the report's own number), ``weights_sha256``, ``versions``, ``training``,
``created``; ``exports`` once exported.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from zoo.preprocess import InputAdapter, Preprocessing

SCHEMA = 1
WEIGHTS = "model.safetensors"
CARD = "card.json"
RECIPE = "recipe.yaml"


class BundleError(RuntimeError):
    """A bundle that is missing, incomplete or altered; the message says which."""


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write`` into a temporary sibling, fsync, rename over ``path``: a killed
    process never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode())


@dataclass
class Bundle:
    """A loaded, verified checkpoint. ``model`` is eval-mode ``Sequential(InputAdapter, net)``."""

    path: Path
    card: dict[str, Any]
    net: nn.Module
    model: nn.Module

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.card["preprocessing"])

    @property
    def labels(self) -> list[str]:
        return list(self.card["labels"])

    @property
    def id(self) -> str:
        return str(self.card["id"])


def full_model(net: nn.Module, prep: Preprocessing) -> nn.Sequential:
    """The served / exported model: preprocessing adapter followed by the network."""
    return nn.Sequential(InputAdapter(prep), net)


def save_bundle(path: Path, net: nn.Module, card: dict[str, Any], recipe_yaml: str) -> Path:
    """Write weights and card; fills ``weights_sha256`` and ``schema`` in the card."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tmp = path / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, path / WEIGHTS)
    card = {**card, "schema": SCHEMA, "weights_sha256": sha256_of(path / WEIGHTS)}
    atomic_write_bytes(path / RECIPE, recipe_yaml.encode())
    write_json(path / CARD, card)
    return path


def read_card(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not (p / CARD).is_file():
        raise BundleError(f"{p} is not a medzoo bundle (no {CARD})")
    try:
        card = json.loads((p / CARD).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{p / CARD} is not valid JSON: {e}") from None
    if card.get("schema") != SCHEMA:
        raise BundleError(f"{p} has card schema {card.get('schema')!r}, expected {SCHEMA}")
    return card


def update_card(path: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge top-level fields into a bundle's card (export results, for instance)."""
    card = read_card(path)
    card.update(fields)
    write_json(Path(path) / CARD, card)
    return card


def verify_weights(path: str | Path, card: dict[str, Any]) -> None:
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise BundleError(f"{path} has no {WEIGHTS}")
    digest = sha256_of(weights)
    if digest != card.get("weights_sha256"):
        raise BundleError(
            f"{weights} does not match its card (sha256 {digest[:12]}…, card says "
            f"{str(card.get('weights_sha256'))[:12]}…): the weights were altered; refusing to load"
        )


def build_net(card: dict[str, Any]) -> nn.Module:
    """An untrained network of the card's architecture (no pretrained download)."""
    from zoo.models import create_model

    prep = Preprocessing.from_dict(card["preprocessing"])
    kwargs = dict(card.get("model_kwargs", {}))
    return create_model(
        card["arch"],
        num_classes=int(card["num_outputs"]),
        in_channels=prep.in_channels,
        input_size=prep.input_size,
        pretrained=False,
        **kwargs,
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
        raise BundleError(f"{p / WEIGHTS} does not fit {card['arch']}: {str(e)[:200]}") from None
    model = full_model(net, Preprocessing.from_dict(card["preprocessing"])).to(device).eval()
    return Bundle(path=p, card=card, net=net, model=model)

"""PyTorch inference shared by training, evaluation and the export parity check: the device, the
batched eval-mode forward pass, and the data splits a recipe or a bundle was trained on."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from zoo.card import Card
from zoo.data import DataSplits, load_dataset, resplit
from zoo.errors import UsageError
from zoo.recipe import Recipe


def pick_device(device: str | None = None) -> torch.device:
    """``device`` when given, else CUDA when present, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, batch_size: int = 128, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Logits of a full model (adapter + net) on uint8 images, in eval mode, batched, on the CPU."""
    model.eval()
    out = [
        model(images[i : i + batch_size].to(device, non_blocking=True)).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros((0, 1))


def load_splits(recipe: Recipe, data_root: str | Path | None, download: bool = True) -> DataSplits:
    """The splits a recipe trains and evaluates on."""
    splits = load_dataset(
        recipe.dataset, size=recipe.data.size, root=data_root, download=download,
        in_channels=recipe.data.channels,
    )
    if recipe.data.val_fraction:
        splits = resplit(splits, recipe.data.val_fraction, recipe.data.split_seed)
    return splits


def bundle_splits(card: Card, data_root: str | Path | None, download: bool = True) -> DataSplits:
    """The splits a bundle was trained on, rebuilt from its resolved recipe; checksum verified."""
    recipe = Recipe.model_validate(card.recipe)
    splits = load_splits(recipe, data_root, download)
    expected = card.dataset.checksum
    if splits.checksum != expected:
        raise UsageError(
            f"the data found ({splits.source}, sha256 {splits.checksum[:12]}…) is not the data "
            f"{card.id} was trained on (sha256 {expected[:12]}…)"
        )
    return splits


__all__ = ["bundle_splits", "load_splits", "pick_device", "predict_logits"]

"""Every recipe file runs end to end (a training step, validation, test, bundle) on synthetic data."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from zoo.bundle import load_bundle
from zoo.data.synthetic import synthetic_arrays, write_synthetic_medmnist
from zoo.names import FOLDER_DATASETS, resolve_name
from zoo.recipe import apply_overrides, load_recipe_file, recipe_files
from zoo.train import train

# A recipe that differs from another one only in numbers outside its model and data (learning rate, epochs,
# patience) trains the same step as that one: checked below, not trained again.
SAME_STEP_AS = {"path-alexnet-lr1e-3": "path-alexnet"}
FILES = {p.stem: p for p in recipe_files() if load_recipe_file(p).dataset != "any"}
RECIPES = [p for name, p in FILES.items() if name not in SAME_STEP_AS]


def _step(path: Path) -> Any:
    """What a training step of the recipe runs: the recipe without its description, and with every
    number outside ``model`` and ``data`` blanked."""
    def blank(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: blank(v) for k, v in value.items()}
        return "#" if isinstance(value, int | float) and not isinstance(value, bool) else value

    recipe = load_recipe_file(path).model_dump(mode="json")
    return {k: v if k in ("model", "data") else blank(v) for k, v in recipe.items()
            if k not in ("name", "citation", "reported", "tune")}


@pytest.mark.parametrize(("name", "other"), SAME_STEP_AS.items())
def test_a_recipe_left_out_trains_the_same_step_as_one_trained(name: str, other: str) -> None:
    assert FILES[other] in RECIPES and _step(FILES[name]) == _step(FILES[other])


def _write_mnist(root: Path) -> None:
    """Tiny files in MNIST's idx format, where torchvision looks for them."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 12)):
        imgs, labels = synthetic_arrays(n, 10, 28, 1, rng)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.reshape(-1).tobytes())


def _write_folder(root: Path, classes: int, size: int) -> None:
    """A user-split folder (train/val/test/<class>/), one or two images per class and split."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / f"class{c}" / f"{i}.png")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_a_step(path: Path, tmp_path: Path) -> None:
    recipe = load_recipe_file(path)
    name = resolve_name(recipe.dataset)
    root = tmp_path / "data"
    if name == "mnist":
        _write_mnist(root)
    elif name in FOLDER_DATASETS:
        _write_folder(root, 8 if name == "isic2019" else 2, min(recipe.data.size, 64))
    else:
        write_synthetic_medmnist(root, name, recipe.data.size, (12, 4, 4))
    # No network here: ImageNet weights are exercised in tests/test_models.py from a local file.
    recipe = apply_overrides(recipe, {"epochs": 1, "batch_size": 4, "train.eval_batch_size": 8, "pretrained": False})
    result = train(recipe, data_root=root, store=tmp_path / "store", progress=False, download=False)
    card = result.card
    assert card.training.epochs_run == 1 and card.reported.report == recipe.report
    assert np.isfinite(card.metrics.history[0]["train_loss"])
    load_bundle(result.bundle)  # the bundle it wrote loads and verifies

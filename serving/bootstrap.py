"""Default models for a fresh machine: what ``zoo serve`` builds when a task has no bundle.

For each of ``skin``, ``organ`` and ``pathology`` without a bundle in the store (and without one
configured): download the MedMNIST file, train a compact recipe (``simplecnn`` at 28 px for a
few epochs; batch 128) and export it to ONNX. The epochs are sized so that the three together
stay under 10 minutes on a 2-core CPU (figures in docs/BENCHMARKS.md, "Serving"). Offline and
without the data, the first missing file stops everything before any training, with
``DataUnavailableError``'s one-line message.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from serving.config import ServeConfig, resolve_task
from zoo.store import TASKS

log = logging.getLogger("serving")

DEFAULT_ARCH = "simplecnn"
# Epochs per task: about 35k, 70k and 90k training images seen (DermaMNIST has 7k training
# images, OrganAMNIST 35k, PathMNIST 90k).
DEFAULT_EPOCHS = {"skin": 5, "organ": 2, "pathology": 1}
BATCH_SIZE = 128


def tasks_to_build(cfg: ServeConfig) -> list[str]:
    """Default tasks with no bundle in the store and none configured."""
    return [t for t in TASKS if cfg.tasks.get(t) is None and resolve_task(cfg, t).path is None]


def export_onnx(bundle: Path) -> Path:
    """``zoo export``'s ONNX step for one bundle; returns the ``model.onnx`` path."""
    from export.onnx_export import export_bundle_onnx

    return Path(export_bundle_onnx(bundle))


def build_default_models(
    tasks: list[str],
    store: Path | None = None,
    data_root: str | Path | None = None,
    download: bool = True,
    epochs: int | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Train and export the compact default model of each task; returns task → bundle."""
    from zoo.data import load_dataset
    from zoo.recipe import apply_overrides, find_recipe
    from zoo.train import train

    if not tasks:
        return {}
    t0 = time.perf_counter()
    # All data first: an offline machine stops here, before any training.
    for task in tasks:
        say(f"serve: checking the data of {task} ({TASKS[task]}, 28 px)")
        load_dataset(TASKS[task], size=28, root=data_root, download=download)
    built: dict[str, Path] = {}
    for i, task in enumerate(tasks, 1):
        n_epochs = epochs or DEFAULT_EPOCHS[task]
        recipe = apply_overrides(find_recipe(TASKS[task], DEFAULT_ARCH),
                                 {"epochs": n_epochs, "batch_size": BATCH_SIZE})
        say(f"serve: [{i}/{len(tasks)}] training the default {task} model: {DEFAULT_ARCH} at 28 px, "
            f"{n_epochs} epoch(s) on {TASKS[task]} (recipe {recipe.name})")
        result = train(recipe, data_root=data_root, store=store, download=download, progress=progress)
        say(f"serve: [{i}/{len(tasks)}] exporting {result.bundle.name} to ONNX")
        export_onnx(result.bundle)
        val = result.card["metrics"]["val"]
        say(f"serve: [{i}/{len(tasks)}] {task}: {result.bundle.name}  val ACC {val['acc']:.3f}  AUC {val['auc']:.3f}  "
            f"({time.perf_counter() - t0:.0f} s so far)")
        built[task] = result.bundle
    return built

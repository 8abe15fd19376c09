"""Default models for a fresh machine: what ``zoo serve`` builds when a task has no bundle.

An orchestration above the applications (it trains, then exports, for the service), so it lives
beside the CLI, not in ``serving`` (which never imports training).

For each of ``skin``, ``organ`` and ``pathology`` without a bundle in the store (and without one
configured): download the MedMNIST file, train a compact model (``simplecnn_v1``, report 001's
two-conv SimpleCNN, at 28 px under the MedMNIST v2 protocol, batch 128, a few epochs) and export
it to ONNX. ``simplecnn_v1`` trains about 2.5 times faster than the batch-normalised
``simplecnn`` on a CPU; with the epochs below the three fit in 10 minutes on a 2-core CPU
(figures in docs/BENCHMARKS.md, "Serving"). These are quick defaults, not the reports' models:
``zoo train`` better ones and the service picks them up. Offline and without the data, the first
missing file stops everything before any training, with ``DataUnavailableError``'s one-line
message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from export.exporter import ensure_exported
from serving.config import ServeConfig, resolve_ensemble, resolve_task
from zoo.data import load_dataset
from zoo.names import TASKS
from zoo.recipe import apply_overrides, find_recipe
from zoo.train import train

log = logging.getLogger("serving")

DEFAULT_ARCH = "simplecnn_v1"
# Epochs per task: about 28k, 35k and 90k training images seen (DermaMNIST has 7k training
# images, OrganAMNIST 35k, PathMNIST 90k).
DEFAULT_EPOCHS = {"skin": 4, "organ": 1, "pathology": 1}
BATCH_SIZE = 128


def tasks_to_build(cfg: ServeConfig) -> list[str]:
    """Default tasks with no bundle in the store and none configured."""
    return [t for t in TASKS if cfg.tasks.get(t) is None and resolve_task(cfg, t).path is None]


def export_served(cfg: ServeConfig, data_root: str | Path | None = None) -> list[Path]:
    """Export ``model.onnx`` for every served bundle (tasks and ensemble) that has none."""
    paths = [r.path for r in (resolve_task(cfg, t) for t in cfg.task_names) if r.path is not None]
    paths += [r.path for r in resolve_ensemble(cfg)[0] if r.path is not None]
    for p in dict.fromkeys(paths):
        ensure_exported(p, ("onnx",), data_root)
    return list(dict.fromkeys(paths))


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
        ensure_exported(result.bundle, ("onnx",), data_root)
        val = result.card.metrics.val
        say(f"serve: [{i}/{len(tasks)}] {task}: {result.bundle.name}  val ACC {val.acc:.3f}  AUC {val.auc:.3f}  "
            f"({time.perf_counter() - t0:.0f} s so far)")
        built[task] = result.bundle
    return built

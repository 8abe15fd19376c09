"""``zoo train``'s entry point: one model, or a seed ensemble of them.

Above both :mod:`zoo.train.engine` (one run) and :mod:`zoo.train.ensemble` (one run per seed, then the
ensemble bundle), so that neither imports the other's caller.
"""

from __future__ import annotations

from pathlib import Path

from zoo.recipe import Recipe
from zoo.train.engine import TrainResult, train_single
from zoo.train.ensemble import train_ensemble
from zoo.train.loop import EpochCallback
from zoo.train.tracking import Parent


def train(
    recipe: Recipe,
    data_root: str | Path | None = None,
    store: Path | None = None,
    device: str | None = None,
    resume: bool = False,
    download: bool = True,
    progress: bool = True,
    on_epoch: EpochCallback | None = None,
    parent: Parent | None = None,
) -> TrainResult:
    """Train a recipe end to end and write its bundle into the store.

    With ``train.seeds`` > 1 (``zoo train … --seeds N``): one run per seed and one ensemble bundle
    of them (:func:`zoo.train.ensemble.train_ensemble`), which is what is returned. ``parent``: the
    tracked run (a tuning study's) this one is a child of (:mod:`zoo.train.tracking`).
    """
    if recipe.train.seeds > 1:
        return train_ensemble(recipe, data_root, store, device, resume, download, progress, on_epoch, parent)
    return train_single(recipe, data_root, store, device, resume, download, progress, on_epoch, parent)


__all__ = ["train"]

"""Seed ensembles as one bundle: ``zoo train DATASET ARCH --seeds N``.

:func:`train_ensemble` trains the recipe once per seed (``seed``, ``seed + 1`` …; each run is an
ordinary bundle, selected on validation as always) and :func:`ensemble_bundles` puts the members
into one bundle of the registry's ``ensemble`` architecture (:mod:`zoo.models.ensemble`: the mean
of the members' logits, the rule of :func:`zoo.ensemble.combine`). That bundle serves, scores,
evaluates and exports like any other; its card lists the members (bundle id, seed, validation
metrics). The ensemble itself is evaluated on validation, then once on test.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from zoo.bundle import Bundle, load_bundle, reserve_dir, save_bundle
from zoo.card import Card, read_card
from zoo.ensemble import COMBINE, check_compatible
from zoo.errors import EnsembleError
from zoo.inference import bundle_splits, pick_device, predict_logits
from zoo.metrics import compute_metrics
from zoo.models import create_model
from zoo.names import short_name
from zoo.postprocess import to_probs
from zoo.preprocess.adapter import full_model
from zoo.recipe import ENSEMBLE, Recipe, apply_overrides
from zoo.store import bundles_dir
from zoo.train.distributed import is_main
from zoo.train.engine import TrainResult, train_single
from zoo.train.loop import EpochCallback
from zoo.train.report import device_name, ensemble_plots, versions
from zoo.train.tracking import (
    NoTracker,
    Parent,
    RunSpec,
    Tracker,
    backend_of,
    dataset_label,
    finish,
    open_tracker,
    params_of,
    tracked,
)
from zoo.trust.fit import fit_bundle

log = logging.getLogger(__name__)


def train_ensemble(recipe: Recipe, data_root: str | Path | None = None, store: Path | None = None,
                   device: str | None = None, resume: bool = False, download: bool = True, progress: bool = True,
                   on_epoch: EpochCallback | None = None, parent: Parent | None = None) -> TrainResult:
    """One run per seed of ``recipe`` (``train.seeds`` of them), then their ensemble bundle. Tracked,
    the ensemble is a run of its own and the members' runs are its children."""
    n, first = recipe.train.seeds, recipe.train.seed
    members = []
    with tracked(_tracker(recipe, store, parent)) as tracker:
        child = Parent.of(tracker.info) or parent
        for k in range(n):
            member = apply_overrides(recipe, {"train.seed": first + k, "train.seeds": 1})
            log.info("ensemble member %d/%d: seed %d", k + 1, n, first + k)
            members.append(train_single(member, data_root, store, device, resume, download, progress, on_epoch,
                                        child).bundle)
        result = ensemble_bundles(members, data_root, store, device, download)
        return TrainResult(result.bundle, finish(tracker, result.bundle))


def _tracker(recipe: Recipe, store: Path | None, parent: Parent | None) -> Tracker:
    """The ensemble's own tracked run (rank 0 only; a new one each time: it has no run directory)."""
    if not is_main():
        return NoTracker()
    dataset = dataset_label(recipe.dataset)
    name = f"{dataset}-{ENSEMBLE}-{recipe.arch}x{recipe.train.seeds}"
    spec = RunSpec(name=name, dataset=dataset, store=store, parent=parent, params=params_of(recipe.run_dict()),
                   tags={"medzoo.recipe": recipe.name, "medzoo.arch": ENSEMBLE})
    return open_tracker(backend_of(recipe.train.track), spec)


def _check_members(bundles: Sequence[Bundle]) -> None:
    """One input adapter and one TTA serve every member: they must agree on both."""
    check_compatible([b.card for b in bundles])
    first = bundles[0].card
    for b in bundles[1:]:
        if b.card.preprocessing != first.preprocessing:
            raise EnsembleError(f"ensemble members preprocess differently ({first.id}: {first.preprocessing}; "
                                f"{b.card.id}: {b.card.preprocessing}); one ensemble bundle needs the same")
        if b.card.tta != first.tta:
            raise EnsembleError(f"ensemble members use different test-time augmentation: {first.id} {first.tta}, "
                                f"{b.card.id} {b.card.tta}")
        if b.card.arch == ENSEMBLE:
            raise EnsembleError(f"{b.card.id} is an ensemble already; combine its members instead")
    if first.arch == ENSEMBLE:
        raise EnsembleError(f"{first.id} is an ensemble already; combine its members instead")


def build_ensemble_net(bundles: Sequence[Bundle]) -> torch.nn.Module:
    """The ``ensemble`` network holding each member's trained weights."""
    first = bundles[0].card
    members = [{"arch": b.card.arch, "model_kwargs": dict(b.card.model_kwargs)} for b in bundles]
    net = create_model(ENSEMBLE, num_classes=first.num_outputs, in_channels=first.preprocessing.in_channels,
                       input_size=first.preprocessing.input_size, members=members)
    for sub, b in zip(net.members, bundles, strict=True):
        sub.load_state_dict(b.net.state_dict())
    return net.eval()


def _member_entry(card: Card) -> dict[str, Any]:
    return {"id": card.id, "arch": card.arch, "seed": card.recipe.get("train", {}).get("seed"),
            "best_epoch": card.metrics.best_epoch, "val": card.metrics.val, "weights_sha256": card.weights_sha256}


def _fields(cards: Sequence[Card], net: torch.nn.Module, metrics: dict[str, Any], dev: torch.device,
            stamp: datetime) -> dict[str, Any]:
    first = cards[0]
    recipe = {**first.recipe, "train": {**first.recipe.get("train", {}), "seeds": len(cards)}}
    return {
        "arch": ENSEMBLE, "model_kwargs": {"members": [{"arch": c.arch, "model_kwargs": dict(c.model_kwargs)}
                                                       for c in cards]},
        "num_outputs": first.num_outputs, "task": first.task, "labels": list(first.labels),
        "preprocessing": first.preprocessing.to_dict(), "tta": list(first.tta),
        "dataset": first.dataset, "recipe": recipe,
        "metrics": {**metrics, "best_epoch": -1, "history": []},
        "reported": first.reported, "versions": versions(),
        "training": {"time_s": round(sum(c.training.time_s for c in cards), 2),
                     "epochs_run": sum(c.training.epochs_run for c in cards), "device": str(dev),
                     "device_name": device_name(dev), "threads": torch.get_num_threads(),
                     "precision": first.training.precision, "run": "",
                     "weights": f"{len(cards)} members' ({COMBINE})", "augment_family": first.training.augment_family,
                     "params": sum(q.numel() for q in net.parameters()),
                     "trainable_params": sum(c.training.trainable_params for c in cards)},
        "ensemble": {"combine": COMBINE, "members": [_member_entry(c) for c in cards]},
        "created": stamp.isoformat(timespec="seconds"),
    }


def ensemble_bundles(paths: Sequence[str | Path], data_root: str | Path | None = None, store: Path | None = None,
                     device: str | None = None, download: bool = True) -> TrainResult:
    """One ``ensemble`` bundle from member bundles trained on the same data (validation, then test once)."""
    if len(paths) < 2:
        raise EnsembleError(f"an ensemble needs at least two members, not {len(paths)}")
    dev = pick_device(device)
    bundles = [load_bundle(p, "cpu") for p in paths]
    _check_members(bundles)
    t0 = time.perf_counter()
    net = build_ensemble_net(bundles)
    first = bundles[0].card
    splits = bundle_splits(first, data_root, download)  # the members' data, checksum checked
    for b in bundles[1:]:
        if b.card.dataset.checksum != first.dataset.checksum:
            raise EnsembleError(f"{b.card.id} was trained on other data than {first.id}")
    model = full_model(net, first.preprocessing, first.tta).to(dev)
    metrics = {}
    for split in ("val", "test"):  # test: the one and only look
        ds = getattr(splits, split)
        logits = predict_logits(model, ds.images, 128, dev)
        metrics[split] = compute_metrics(ds.labels.numpy(), to_probs(logits.numpy()), splits.labels)
    stamp = datetime.now(timezone.utc)
    fields = _fields([b.card for b in bundles], net, metrics, dev, stamp)
    tag = hashlib.sha256("".join(b.card.weights_sha256 for b in bundles).encode()).hexdigest()[:8]
    name = f"{short_name(splits.name)}-{ENSEMBLE}-{first.arch}x{len(bundles)}-{stamp:%Y%m%d-%H%M%S}-{tag}"
    path = reserve_dir(bundles_dir(store), name)
    save_bundle(path, net.cpu(), fields, yaml.safe_dump(fields["recipe"], sort_keys=False))
    ensemble_plots(path, [(b.card.recipe.get("train", {}).get("seed"), b.card.metrics.history,
                           b.card.metrics.best_epoch) for b in bundles],
                   metrics["test"]["confusion"], splits.labels)
    fit_bundle(path, splits)  # calibration and the OOD detector of the ensemble itself; README.md
    log.info("ensemble of %d members in %.1f s: %s", len(bundles), time.perf_counter() - t0, path.name)
    return TrainResult(bundle=path, card=read_card(path))


__all__ = ["build_ensemble_net", "ensemble_bundles", "train_ensemble"]

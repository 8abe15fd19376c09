"""``zoo train``: a recipe in, a bundle out.

:func:`train` loads the data, builds the run (:class:`~zoo.train.loop.Session`), claims a run
directory (:mod:`zoo.train.checkpoint`: lock, snapshots, resume), runs the epochs
(:mod:`zoo.train.loop`), then evaluates the best weights — chosen on validation — once on the
test split and writes the bundle with its card, plots and Markdown model card
(:mod:`zoo.train.report`), fits the calibration and the out-of-distribution detector on the
validation split (:mod:`zoo.trust.fit`) and writes the Markdown model card (:mod:`zoo.modelcard`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from zoo.bundle import reserve_dir, save_bundle
from zoo.card import Card, read_card
from zoo.data import DataSplits
from zoo.errors import TrainingError
from zoo.inference import load_splits, pick_device
from zoo.io import atomic_write_bytes
from zoo.names import short_name
from zoo.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from zoo.preprocess.adapter import normalisation_stats
from zoo.recipe import Recipe
from zoo.store import bundles_dir, runs_dir
from zoo.train.checkpoint import Progress, RunDir, progress_of
from zoo.train.distributed import Dist, broadcast, from_env, restarted
from zoo.train.loop import EpochCallback, Session, end_epoch, eval_model, evaluate, train_epoch
from zoo.train.precision import use_bf16_autocast
from zoo.train.report import card_fields, plots
from zoo.train.tracking import (
    NoTracker,
    Parent,
    RunSpec,
    Tracker,
    backend_of,
    finish,
    open_tracker,
    params_of,
    require,
    tracked,
)
from zoo.trust.fit import fit_bundle

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    bundle: Path
    card: Card


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_preprocessing(recipe: Recipe, splits: DataSplits) -> Preprocessing:
    """The recipe's normalisation: the train split's statistics, ImageNet's, or none."""
    c = splits.in_channels
    if recipe.data.normalize == "dataset":
        mean, std = normalisation_stats(splits.train.images)
    elif recipe.data.normalize == "imagenet":
        grey = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else grey
    else:
        mean, std = (0.0,) * c, (1.0,) * c
    return Preprocessing(splits.image_size, recipe.input_size, c, mean, std)


def run_id(recipe: Recipe, splits: DataSplits) -> str:
    """Same recipe and data → same run directory, which is what ``--resume`` finds."""
    h = hashlib.sha256(json.dumps(recipe.run_dict(), sort_keys=True).encode() + splits.checksum.encode())
    return f"{short_name(splits.name)}-{recipe.arch}-{h.hexdigest()[:10]}"


def _start(s: Session, run: RunDir, resume: bool) -> Progress:
    """Fresh progress, or the run's last snapshot restored."""
    snap = run.load(s.device) if resume else None
    if snap is None:
        if resume:
            log.info("nothing to resume in %s: starting fresh", run.path)
        return Progress()
    s.restore(snap)
    p = progress_of(snap)
    if snap.get("stopped"):
        p.next_epoch = s.recipe.train.epochs  # it had stopped early: nothing left to run
    log.info("resuming %s at epoch %d", run.path.name, p.next_epoch + 1)
    return p


def _callback(on_epoch: EpochCallback | None, row: dict[str, Any], d: Dist | None) -> None:
    """``on_epoch`` on rank 0 (the one process without torchrun); when it raises (an Optuna pruner),
    every rank stops after this epoch and rank 0 raises it on."""
    error: BaseException | None = None
    if on_epoch is not None and (d is None or d.main):
        try:
            on_epoch(row)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = e
    if broadcast(error is not None, d):
        if error is not None:
            raise error
        raise TrainingError(f"stopped after epoch {row['epoch']} by rank 0")


def _run_epochs(s: Session, p: Progress, run: RunDir, progress: bool, on_epoch: EpochCallback | None,
                tracker: Tracker) -> None:
    cfg = s.recipe.train
    patience = cfg.early_stopping.patience
    main = s.dist is None or s.dist.main
    bar = tqdm(range(p.next_epoch, cfg.epochs), initial=p.next_epoch, total=cfg.epochs,
               desc=f"{s.splits.name} {s.recipe.arch}", unit="epoch", disable=not progress or not main)
    for epoch in bar:
        row = end_epoch(s, p, epoch, train_epoch(s))
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{row['val_acc']:.3f}",
                        val_auc=f"{row['val_auc']:.3f}")
        stop = patience is not None and p.bad_epochs >= patience
        run.save(s.snapshot(epoch, p, stop))  # rank 0 only (the others follow its directory)
        tracker.log_epoch(row)  # after the snapshot: a resumed run logs what it missed from there
        try:
            _callback(on_epoch, row, s.dist)
        except BaseException:
            tracker.stopped = True  # stopped on purpose (an Optuna pruner): the tracked run ends KILLED
            raise
        if stop:
            log.info("early stopping after epoch %d (best %d)", epoch + 1, p.best_epoch)
            break
    bar.close()


def _finish(s: Session, p: Progress, run: RunDir, store: Path | None, train_time: float) -> Path:
    """Best weights → validation and (once) test metrics → bundle, plots, Markdown card.

    The best weights are the evaluated network's (raw, or the EMA / SWA average) of the selected
    epoch; they go back into the network, which is evaluated (with the recipe's TTA) and saved."""
    if p.best_state is None:  # every validation score was NaN (a diverged run), or no epoch ran
        metric = s.recipe.train.early_stopping.metric
        raise TrainingError(f"no epoch had a finite validation {metric} ({len(p.history)} run, last train loss "
                            f"{p.history[-1]['train_loss'] if p.history else 'none'}): the run diverged or "
                            "ran no epoch; lower the learning rate or check the data")
    s.net.load_state_dict(p.best_state)
    final = eval_model(s, s.net)
    _, val, _ = evaluate(s, s.splits.val, final)
    _, test, _ = evaluate(s, s.splits.test, final)  # the one and only look at the test split
    if s.dist is not None and not s.dist.main:  # rank 0 writes the bundle
        return broadcast(None, s.dist)
    stamp = datetime.now(timezone.utc)
    fields = card_fields(s, p, val, test, train_time, run.path.name, stamp)
    tag = hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in p.best_state.values())).hexdigest()[:8]
    name = f"{short_name(s.splits.name)}-{s.recipe.arch}-{stamp:%Y%m%d-%H%M%S}-{tag}"
    path = reserve_dir(bundles_dir(store), name)
    save_bundle(path, s.net.cpu(), fields, yaml.safe_dump(s.recipe.to_dict(), sort_keys=False))
    plots(path, p.history, p.best_epoch, test["confusion"], s.splits.labels)
    # calibration and the OOD detector (validation only), README.md; a smoke run (max_batches) fits
    # the detector on as many train images as it trained on, not the whole subset (minutes at 224 px)
    cfg = s.recipe.train
    if cfg.max_batches:
        fit_bundle(path, s.splits, max_train_images=max(64, cfg.max_batches * cfg.batch_size))
    else:
        fit_bundle(path, s.splits)
    run.finish(path)
    return broadcast(path, s.dist)


def train_single(
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
    """Train one model of a recipe (its ``train.seed``) end to end and write its bundle into the store.
    :func:`zoo.train.train` is the entry point: it also trains seed ensembles (``train.seeds`` > 1).
    ``parent``: the tracked run this one is a child of (:mod:`zoo.train.tracking`)."""
    d = from_env(device)  # under torchrun: this rank joins the process group
    if d is None or d.main:  # a missing tracker package fails now, not after loading the data
        require(parent.backend if parent is not None else backend_of(recipe.train.track))
    resume = resume or (d is not None and restarted())  # torchrun restarted the group after a rank died
    dev = d.device() if d is not None else pick_device(device)
    use_amp = use_bf16_autocast(recipe.train.precision, dev)  # before any work: bf16 may be refused
    seed_everything(recipe.train.seed)
    splits = load_splits(recipe, data_root, download)
    recipe = recipe.for_dataset(splits.name)  # a protocol's augmentation / TTA for this modality
    with _run_dir(store, run_id(recipe, splits), resume, d) as run:
        done = broadcast(run.finished_bundle() if resume and run.writer else None, d)
        if done is not None:  # this very recipe on this very data has finished: nothing to resume
            log.info("%s has finished already: %s", run.path.name, done)
            return TrainResult(bundle=done, card=read_card(done))
        s = Session.create(recipe, splits, make_preprocessing(recipe, splits), dev, use_amp, d)
        p = _start(s, run, resume)
        if d is not None:  # dropout and other draws differ between ranks (the permutation does not)
            torch.manual_seed(recipe.train.seed * 1000 + d.rank + p.next_epoch)
        if run.writer:
            atomic_write_bytes(run.path / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False).encode())
        with tracked(_tracker(recipe, splits.name, run, store, resume, p, parent, d)) as tracker:
            t0 = time.perf_counter()
            _run_epochs(s, p, run, progress, on_epoch, tracker)
            path = _finish(s, p, run, store, time.perf_counter() - t0)
            finish(tracker, path)  # the run id into the card, final figures and files to the run
    return TrainResult(bundle=path, card=read_card(path))


def _tracker(recipe: Recipe, dataset: str, run: RunDir, store: Path | None, resume: bool, p: Progress,
             parent: Parent | None, d: Dist | None) -> Tracker:
    """The run's tracker (rank 0 only): MLflow, TensorBoard or none (:mod:`zoo.train.tracking`)."""
    if d is not None and not d.main:
        return NoTracker()
    # a resumed snapshot continues its tracked run; a resume that starts afresh (a finished run whose
    # bundle is gone, or one killed before its first snapshot) starts a new one
    spec = RunSpec(name=run.path.name, dataset=dataset, store=store, state=run.path,
                   resume=resume and p.next_epoch > 0, parent=parent, history=p.history,
                   params=params_of(recipe.run_dict()),
                   tags={"medzoo.dataset": dataset, "medzoo.recipe": recipe.name, "medzoo.arch": recipe.arch,
                         "medzoo.run_dir": str(run.path)})
    return open_tracker(backend_of(recipe.train.track), spec)


def _run_dir(store: Path | None, rid: str, resume: bool, d: Dist | None) -> RunDir:
    """Rank 0 (or the one process) claims the run directory; the other ranks follow it."""
    if d is None:
        return RunDir(runs_dir(store), rid, resume)
    run = RunDir(runs_dir(store), rid, resume) if d.main else None
    path = broadcast(run.path if run is not None else None, d)
    return run if run is not None else RunDir(runs_dir(store), rid, resume, path=path)


__all__ = ["TrainResult", "make_preprocessing", "run_id", "seed_everything", "train_single"]

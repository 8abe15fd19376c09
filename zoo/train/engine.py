"""The training engine behind ``zoo train``.

Data stay in memory as uint8 tensors (on the GPU when there is one); each batch is indexed,
augmented and normalised as a whole. Every epoch ends with an atomic snapshot in the run
directory, so a killed run continues with ``resume=True``. The best epoch is chosen on the
validation split; the test split is evaluated once, at the end, with the best weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from zoo import __version__
from zoo.bundle import atomic_write_bytes, read_card, save_bundle, write_json
from zoo.data import DataSplits, load_dataset, resplit
from zoo.metrics import compute_metrics, to_probs
from zoo.models import create_model
from zoo.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputAdapter,
    Preprocessing,
    normalisation_stats,
)
from zoo.recipe import Recipe
from zoo.store import bundles_dir, runs_dir
from zoo.train.augment import augment
from zoo.train.optim import (
    build_optimizer,
    build_scheduler,
    compute_loss,
    num_outputs,
    penalty,
)

log = logging.getLogger(__name__)
STATE = "state.pt"


@dataclass
class TrainResult:
    bundle: Path
    card: dict[str, Any]


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(dev: torch.device) -> bool:
    """Whether ``dev`` computes bf16 natively: a CUDA GPU with bf16, or a CPU with AMX tiles or
    AVX512-BF16 (oneDNN then runs bf16 convolutions and matmuls at up to twice the fp32 rate;
    elsewhere bf16 is emulated and slower than fp32)."""
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        # Private probes (torch.cpu._is_*); a torch without them is treated as lacking the ISA.
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def use_bf16_autocast(precision: str, dev: torch.device) -> bool:
    """The recipe's ``train.precision`` on ``dev``: ``auto`` is bf16 on a GPU only."""
    if precision == "fp32":
        return False
    if precision == "auto":
        return dev.type == "cuda" and native_bf16(dev)
    if not native_bf16(dev):
        raise ValueError(f"precision bf16 asked for, but {dev} has no native bf16 arithmetic; use fp32 or auto")
    return True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_splits(recipe: Recipe, data_root: str | Path | None, download: bool = True) -> DataSplits:
    """The splits a recipe trains and evaluates on (also used by ``zoo eval``)."""
    splits = load_dataset(
        recipe.dataset, size=recipe.data.size, root=data_root, download=download,
        in_channels=recipe.data.channels,
    )
    if recipe.data.val_fraction:
        splits = resplit(splits, recipe.data.val_fraction, recipe.data.split_seed)
    return splits


def make_preprocessing(recipe: Recipe, splits: DataSplits) -> Preprocessing:
    c = splits.in_channels
    if recipe.data.normalize == "dataset":
        mean, std = normalisation_stats(splits.train.images)
    elif recipe.data.normalize == "imagenet":
        grey = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else grey
    else:
        mean, std = (0.0,) * c, (1.0,) * c
    return Preprocessing(splits.image_size, recipe.input_size, c, mean, std)


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, batch_size: int = 128, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Logits of a full model (adapter + net) on uint8 images, in eval mode, batched."""
    model.eval()
    out = [
        model(images[i : i + batch_size].to(device, non_blocking=True)).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros((0, 1))


def _selection_score(metrics: dict[str, Any], loss: float, metric: str) -> float:
    value = -loss if metric == "loss" else metrics[metric]
    return -math.inf if math.isnan(value) else value


def run_id(recipe: Recipe, splits: DataSplits) -> str:
    """Same recipe and data → same run directory, which is what ``--resume`` finds."""
    h = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode() + splits.checksum.encode())
    short = splits.name.split("/")[-1].replace("folder:", "")
    return f"{short}-{recipe.arch}-{h.hexdigest()[:10]}"


def _plots(path: Path, history: list[dict[str, float]], confusion: list[list[int]], labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
    ax[0].plot(ep, [h["val_loss"] for h in history], label="validation")
    ax[0].set(xlabel="epoch", ylabel="loss", title="loss")
    ax[1].plot(ep, [h["val_acc"] for h in history], label="val ACC")
    ax[1].plot(ep, [h["val_auc"] for h in history], label="val AUC")
    ax[1].set(xlabel="epoch", title="validation")
    for a in ax:
        a.legend()
    fig.tight_layout()
    fig.savefig(path / "curves.png", dpi=100)
    plt.close(fig)
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, a = plt.subplots(figsize=(max(4, len(labels) * 0.8), max(4, len(labels) * 0.8)))
    short = [l[:18] for l in labels]
    ConfusionMatrixDisplay(np.array(confusion), display_labels=short).plot(ax=a, colorbar=False, xticks_rotation=45)
    a.set_title("test confusion matrix")
    fig.tight_layout()
    fig.savefig(path / "confusion.png", dpi=100)
    plt.close(fig)


def _versions() -> dict[str, str]:
    import medmnist
    import torchvision

    return {
        "medzoo": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "medmnist": medmnist.__version__,
        "python": platform.python_version(),
    }


def train(
    recipe: Recipe,
    data_root: str | Path | None = None,
    store: Path | None = None,
    device: str | None = None,
    resume: bool = False,
    download: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train a recipe end to end and write its bundle into the store."""
    dev = pick_device(device)
    use_amp = use_bf16_autocast(recipe.train.precision, dev)  # before any work: bf16 may be refused
    seed_everything(recipe.train.seed)
    splits = load_splits(recipe, data_root, download)
    prep = make_preprocessing(recipe, splits)
    outputs = num_outputs(recipe.loss, splits.num_classes)
    net = create_model(
        recipe.arch, num_classes=outputs, in_channels=prep.in_channels,
        input_size=prep.input_size, pretrained=recipe.pretrained, **recipe.model_kwargs(),
    )
    # channels_last: oneDNN / cuDNN convolutions run faster on NHWC (≈ 25 % for the reports' CNNs)
    model = nn.Sequential(InputAdapter(prep), net).to(dev, memory_format=torch.channels_last)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = build_optimizer(params, recipe.optimizer)
    cfg = recipe.train
    n_train = len(splits.train)
    steps = max(1, math.ceil(n_train / cfg.batch_size))
    sched, sched_when = build_scheduler(opt, recipe.scheduler, cfg.epochs, steps, recipe.optimizer.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_x = splits.train.images.to(dev)
    train_y = splits.train.labels.to(dev)
    if cfg.balance:  # weight 1/count per class, drawn with replacement (WeightedRandomSampler)
        counts = torch.bincount(splits.train.labels, minlength=splits.num_classes).clamp_min(1)
        sample_w = (1.0 / counts.double())[splits.train.labels]

    run_dir = runs_dir(store) / run_id(recipe, splits)
    start_epoch, history, best = 0, [], {"score": -math.inf, "epoch": -1, "state": None}
    bad_epochs = 0
    state_file = run_dir / STATE
    if resume and state_file.is_file():
        # weights_only: the restricted unpickler, tensors and plain containers only
        st = torch.load(state_file, map_location=dev, weights_only=True)
        net.load_state_dict(st["net"])
        opt.load_state_dict(st["opt"])
        if sched is not None and st["sched"] is not None:
            sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        start_epoch, history, bad_epochs = st["epoch"] + 1, st["history"], st["bad_epochs"]
        best = {"score": st["best_score"], "epoch": st["best_epoch"], "state": st["best_state"]}
        log.info("resuming %s at epoch %d", run_dir.name, start_epoch + 1)
    elif resume:
        log.info("nothing to resume in %s: starting fresh", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False).encode())

    patience = cfg.early_stopping.patience
    metric = cfg.early_stopping.metric
    t0 = time.perf_counter()
    bar = tqdm(range(start_epoch, cfg.epochs), initial=start_epoch, total=cfg.epochs,
               desc=f"{splits.name} {recipe.arch}", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        if cfg.balance:
            order = torch.multinomial(sample_w, n_train, replacement=True, generator=gen)
        else:
            order = torch.randperm(n_train, generator=gen)
        order = order.to(dev)
        total, seen = 0.0, 0
        for i in range(0, n_train, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2 and i > 0:  # BatchNorm cannot train on one sample
                continue
            x = augment(train_x[idx].float().div_(255), recipe.augment, gen)
            x = x.contiguous(memory_format=torch.channels_last)
            y = train_y[idx]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
            loss = compute_loss(logits.float(), y, recipe.loss)
            pen = penalty(net, recipe.loss)
            opt.zero_grad(set_to_none=True)
            (loss if pen is None else loss + pen).backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if sched is not None and sched_when == "batch":
                sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        val_logits = predict_logits(model, splits.val.images, cfg.eval_batch_size, dev)
        val_loss = float(compute_loss(val_logits, splits.val.labels, recipe.loss))
        val = compute_metrics(splits.val.labels.numpy(), to_probs(val_logits), splits.labels)
        row = {"epoch": epoch + 1, "train_loss": total / max(seen, 1), "val_loss": val_loss,
               "val_acc": val["acc"], "val_auc": val["auc"], "val_macro_f1": val["macro_f1"],
               "lr": opt.param_groups[0]["lr"]}
        history.append(row)
        score = _selection_score(val, val_loss, metric)
        if score > best["score"]:
            best = {"score": score, "epoch": epoch + 1,
                    "state": {k: v.detach().clone() for k, v in net.state_dict().items()}}
            bad_epochs = 0
        else:
            bad_epochs += 1
        if sched is not None and sched_when == "epoch":
            sched.step()
        elif sched is not None and sched_when == "metric":
            sched.step(score)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{val['acc']:.3f}", val_auc=f"{val['auc']:.3f}")
        stop = patience is not None and bad_epochs >= patience
        snapshot = {
            "epoch": epoch, "net": net.state_dict(), "opt": opt.state_dict(),
            "sched": sched.state_dict() if sched is not None else None,
            "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
            "bad_epochs": bad_epochs, "best_score": best["score"], "best_epoch": best["epoch"],
            "best_state": best["state"], "stopped": stop,
        }
        tmp = run_dir / f".{STATE}.tmp"
        torch.save(snapshot, tmp)
        tmp.replace(state_file)
        if stop:
            log.info("early stopping after epoch %d (best %d)", epoch + 1, best["epoch"])
            break
    bar.close()
    train_time = time.perf_counter() - t0

    if best["state"] is None:  # resumed a run that had already finished every epoch
        st = torch.load(state_file, map_location=dev, weights_only=True)
        best = {"score": st["best_score"], "epoch": st["best_epoch"], "state": st["best_state"]}
    net.load_state_dict(best["state"])
    model.eval()
    val_logits = predict_logits(model, splits.val.images, cfg.eval_batch_size, dev)
    val = compute_metrics(splits.val.labels.numpy(), to_probs(val_logits), splits.labels)
    # The one and only look at the test split.
    test_logits = predict_logits(model, splits.test.images, cfg.eval_batch_size, dev)
    test = compute_metrics(splits.test.labels.numpy(), to_probs(test_logits), splits.labels)

    stamp = datetime.now(timezone.utc)
    card: dict[str, Any] = {
        "arch": recipe.arch,
        "model_kwargs": recipe.model_kwargs(),
        "num_outputs": outputs,
        "task": splits.task,
        "labels": splits.labels,
        "preprocessing": prep.to_dict(),
        "dataset": splits.describe(),
        "recipe": recipe.to_dict(),
        "metrics": {"val": val, "test": test, "best_epoch": best["epoch"], "history": history},
        "reported": {**recipe.reported.model_dump(), "report": recipe.report, "citation": recipe.citation},
        "versions": _versions(),
        "training": {"time_s": round(train_time, 2), "epochs_run": len(history), "device": str(dev),
                     "precision": "bf16 autocast" if use_amp else "fp32",
                     "run": run_dir.name, "params": sum(p.numel() for p in net.parameters()),
                     "trainable_params": sum(p.numel() for p in params)},
        "created": stamp.isoformat(timespec="seconds"),
    }
    weights_tag = hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in best["state"].values())).hexdigest()[:8]
    card["id"] = f"{run_dir.name.rsplit('-', 1)[0]}-{stamp:%Y%m%d-%H%M%S}-{weights_tag}"
    path = bundles_dir(store) / card["id"]
    save_bundle(path, net.cpu(), card, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    _plots(path, history, test["confusion"], splits.labels)
    write_json(run_dir / "done.json", {"bundle": str(path)})
    state_file.unlink(missing_ok=True)
    return TrainResult(bundle=path, card=read_card(path))

"""What a finished run writes about itself: the card's fields and the training plots."""

from __future__ import annotations

import os
import platform
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo._version import __version__
from zoo.benchmarks import published_for
from zoo.recipe import PROTOCOL
from zoo.train.checkpoint import Progress
from zoo.train.loop import Session


def versions() -> dict[str, str]:
    import medmnist
    import torchvision

    return {
        "medzoo": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "medmnist": medmnist.__version__,
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(dev: torch.device) -> str:
    """The hardware that ran the computation (bit-exact reruns need the same one)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{_cpu_model()} ({platform.machine()}, {os.cpu_count()} logical CPUs)"


def weights_kind(s: Session, epochs_run: int) -> str:
    """Which weights the bundle holds (card ``training.weights``)."""
    if s.averager is not None:
        return s.averager.describe(epochs_run)
    return "the selected epoch's"


def reported(s: Session) -> dict[str, Any]:
    """The report's own number; for the MedMNIST v2 protocol, the published row of this very
    architecture and input size when the benchmark has one (ResNet-18/50 at 28 or 224 px)."""
    recipe = s.recipe
    out = {**recipe.reported.model_dump(), "report": recipe.report, "citation": recipe.citation}
    if recipe.reported.value is None and recipe.report == PROTOCOL:  # v2's own table is its report
        row = published_for(s.splits.name, recipe.arch, recipe.input_size)
        if row is not None:
            out.update(metric="test_auc", value=row.auc,
                       note=f"{row.method}: test AUC {row.auc:.3f}, ACC {row.acc:.3f} ({row.source})")
    return out


def card_fields(s: Session, p: Progress, val: dict[str, Any], test: dict[str, Any], train_time: float,
                run_name: str, stamp: datetime) -> dict[str, Any]:
    """Every card field a training run knows (``id``, ``schema``, weights hash: ``save_bundle``)."""
    recipe, splits = s.recipe, s.splits
    return {
        "arch": recipe.arch,
        "model_kwargs": recipe.model_kwargs(),
        "num_outputs": s.outputs,
        "task": splits.task,
        "labels": splits.labels,
        "preprocessing": s.prep.to_dict(),
        "tta": list(recipe.tta),
        "dataset": splits.describe(),
        "recipe": recipe.to_dict(),
        "metrics": {"val": val, "test": test, "best_epoch": p.best_epoch, "history": p.history},
        "reported": reported(s),
        "versions": versions(),
        "training": {
            "time_s": round(train_time, 2), "epochs_run": len(p.history), "device": str(s.device),
            "device_name": device_name(s.device), "threads": torch.get_num_threads(),
            "precision": "bf16 autocast" if s.use_amp else "fp32", "run": run_name,
            "weights": weights_kind(s, len(p.history)), "augment_family": recipe.family_of(splits.name),
            "params": sum(q.numel() for q in s.net.parameters()), "trainable_params": sum(q.numel() for q in s.params),
            # processes (torchrun): the recipe's batch is per process, the effective batch is the sum
            "world_size": s.world, "effective_batch_size": recipe.train.batch_size * s.world,
            "backend": s.dist.backend if s.dist is not None else None,
        },
        "created": stamp.isoformat(timespec="seconds"),
    }


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(path: Path, history: list[dict[str, float]], best_epoch: int, confusion: list[list[int]],
          labels: list[str]) -> None:
    """``curves.png`` (loss and validation metrics, the selected epoch marked) and ``confusion.png``."""
    plt = _pyplot()
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
    ax[0].plot(ep, [h["val_loss"] for h in history], label="validation")
    ax[0].set(xlabel="epoch", ylabel="loss", title="loss")
    ax[1].plot(ep, [h["val_acc"] for h in history], label="val ACC")
    ax[1].plot(ep, [h["val_auc"] for h in history], label="val AUC")
    ax[1].set(xlabel="epoch", title="validation")
    for a in ax:
        if best_epoch > 0:
            a.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"selected (epoch {best_epoch})")
        a.legend()
    fig.tight_layout()
    fig.savefig(path / "curves.png", dpi=100)
    plt.close(fig)
    confusion_plot(path, confusion, labels)


def ensemble_plots(path: Path, members: list[tuple[int | None, list[dict[str, Any]], int]],
                   confusion: list[list[int]], labels: list[str]) -> None:
    """An ensemble's ``curves.png`` (each member's validation loss and AUC by seed, its selected
    epoch marked) and ``confusion.png`` (the ensemble on test)."""
    plt = _pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for seed, history, best_epoch in members:
        ep = [h["epoch"] for h in history]
        line = ax[0].plot(ep, [h["val_loss"] for h in history], label=f"seed {seed}")[0]
        ax[1].plot(ep, [h["val_auc"] for h in history], color=line.get_color(), label=f"seed {seed}")
        chosen = [h for h in history if h["epoch"] == best_epoch]
        if chosen:
            ax[1].plot([best_epoch], [chosen[0]["val_auc"]], "o", color=line.get_color())
    ax[0].set(xlabel="epoch", ylabel="loss", title="members: validation loss")
    ax[1].set(xlabel="epoch", title="members: validation AUC (dot: selected epoch)")
    for a in ax:
        a.legend()
    fig.tight_layout()
    fig.savefig(path / "curves.png", dpi=100)
    plt.close(fig)
    confusion_plot(path, confusion, labels)


def confusion_plot(path: Path, confusion: list[list[int]], labels: list[str]) -> None:
    """``confusion.png``: the test confusion matrix."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    fig, a = plt.subplots(figsize=(max(4, len(labels) * 0.8), max(4, len(labels) * 0.8)))
    short = [lab[:18] for lab in labels]
    ConfusionMatrixDisplay(np.array(confusion), display_labels=short).plot(ax=a, colorbar=False, xticks_rotation=45)
    a.set_title("test confusion matrix")
    fig.tight_layout()
    fig.savefig(path / "confusion.png", dpi=100)
    plt.close(fig)

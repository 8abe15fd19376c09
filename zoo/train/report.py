"""What a finished run writes about itself: the card's fields and the training plots."""

from __future__ import annotations

import platform
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo._version import __version__
from zoo.benchmarks import published_for
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


def device_name(dev: torch.device) -> str:
    """The hardware that ran the computation (bit-exact reruns need the same one)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine()


def reported(s: Session) -> dict[str, Any]:
    """The report's own number; for the MedMNIST v2 protocol, the published row of this very
    architecture and input size when the benchmark has one (ResNet-18/50 at 28 or 224 px)."""
    recipe = s.recipe
    out = {**recipe.reported.model_dump(), "report": recipe.report, "citation": recipe.citation}
    if recipe.reported.value is None:
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
        "dataset": splits.describe(),
        "recipe": recipe.to_dict(),
        "metrics": {"val": val, "test": test, "best_epoch": p.best_epoch, "history": p.history},
        "reported": reported(s),
        "versions": versions(),
        "training": {
            "time_s": round(train_time, 2), "epochs_run": len(p.history), "device": str(s.device),
            "device_name": device_name(s.device), "threads": torch.get_num_threads(),
            "precision": "bf16 autocast" if s.use_amp else "fp32", "run": run_name,
            "params": sum(q.numel() for q in s.net.parameters()), "trainable_params": sum(q.numel() for q in s.params),
        },
        "created": stamp.isoformat(timespec="seconds"),
    }


def plots(path: Path, history: list[dict[str, float]], best_epoch: int, confusion: list[list[int]],
          labels: list[str]) -> None:
    """``curves.png`` (loss and validation metrics, the selected epoch marked) and ``confusion.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

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

    fig, a = plt.subplots(figsize=(max(4, len(labels) * 0.8), max(4, len(labels) * 0.8)))
    short = [lab[:18] for lab in labels]
    ConfusionMatrixDisplay(np.array(confusion), display_labels=short).plot(ax=a, colorbar=False, xticks_rotation=45)
    a.set_title("test confusion matrix")
    fig.tight_layout()
    fig.savefig(path / "confusion.png", dpi=100)
    plt.close(fig)

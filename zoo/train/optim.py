"""Optimisers, schedulers and losses named by recipes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import UsageError
from zoo.recipe import LossCfg, OptimizerCfg, SchedulerCfg

_OPTIMISERS = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
    "nadam": torch.optim.NAdam,
    "rmsprop": torch.optim.RMSprop,
}


# Optimisers with a fused (single-kernel) implementation on CPU and CUDA: fewer small ops per step,
# which is most of a step's time for the small networks of the reports.
_FUSED = {"adamw", "adam", "sgd"}


def build_optimizer(params: list[nn.Parameter], cfg: OptimizerCfg) -> torch.optim.Optimizer:
    kwargs: dict[str, float | bool] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.name in ("sgd", "rmsprop"):
        kwargs["momentum"] = cfg.momentum
    if cfg.name in _FUSED and all(p.dtype == torch.float32 for p in params):
        kwargs["fused"] = True
    return _OPTIMISERS[cfg.name](params, **kwargs)


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: SchedulerCfg, epochs: int, steps_per_epoch: int, lr: float
) -> tuple[object | None, str]:
    """The scheduler and when it steps: ``"epoch"``, ``"batch"`` or ``"metric"`` (plateau)."""
    if cfg.name == "none":
        return None, "epoch"
    if cfg.name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, cfg.step_size, cfg.gamma), "epoch"
    if cfg.name == "multistep":
        milestones = sorted({max(1, round(m * epochs)) for m in cfg.milestones})
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones, cfg.gamma), "epoch"
    if cfg.name == "cosine":
        return _warmup_cosine(opt, cfg, epochs * steps_per_epoch, steps_per_epoch), "batch"
    if cfg.name == "plateau":
        return (
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="max", factor=cfg.gamma, patience=cfg.patience
            ),
            "metric",
        )
    return (
        torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.max_lr or lr, epochs=epochs, steps_per_epoch=steps_per_epoch
        ),
        "batch",
    )


def _warmup_cosine(opt: torch.optim.Optimizer, cfg: SchedulerCfg, total: int, steps_per_epoch: int) -> object:
    """Per batch: linear warm-up from ``lr * warmup_start_factor`` over ``warmup_epochs``, then a
    cosine decay to ``min_lr`` over the remaining steps (the timm / "ResNet strikes back" schedule)."""
    warm = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - warm), eta_min=cfg.min_lr)
    if warm <= 0:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=cfg.warmup_start_factor, end_factor=1.0,
                                               total_iters=warm)
    return torch.optim.lr_scheduler.SequentialLR(opt, [linear, cosine], milestones=[warm])


def num_outputs(loss: LossCfg, num_classes: int) -> int:
    """BCE and hinge train a single-logit binary head (report 004); cross-entropy one per class."""
    if loss.name in ("bce", "hinge"):
        if num_classes != 2:
            raise UsageError(f"{loss.name} loss needs a binary dataset, this one has {num_classes} classes")
        return 1
    return num_classes


def compute_loss(logits: torch.Tensor, y: torch.Tensor, cfg: LossCfg) -> torch.Tensor:
    if cfg.name == "cross_entropy":
        return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    z = logits.squeeze(1)
    if cfg.name == "bce":
        return F.binary_cross_entropy_with_logits(z, y.to(z.dtype))
    signed = y.to(z.dtype) * 2 - 1  # hinge uses labels −1 / 1
    return torch.clamp(1 - signed * z, min=0).mean()


def penalty(net: nn.Module, cfg: LossCfg) -> torch.Tensor | None:
    """Explicit L1 / L2 penalties on the trainable weight tensors (report 002's L1+L2 MLP)."""
    if cfg.l1 == 0 and cfg.l2 == 0:
        return None
    weights = [p for p in net.parameters() if p.requires_grad and p.ndim > 1]
    total = torch.zeros((), device=weights[0].device)
    if cfg.l1:
        total = total + cfg.l1 * sum(p.abs().sum() for p in weights)
    if cfg.l2:
        total = total + cfg.l2 * sum(p.pow(2).sum() for p in weights)
    return total

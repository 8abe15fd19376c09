"""Weight averaging during training: EMA or SWA (``torch.optim.swa_utils``), as a recipe asks.

The averaged network is what a run validates, selects and saves (``zoo.train.loop``):

* **EMA** (exponential moving average; Polyak & Juditsky 1992, the "EMA of weights" of timm and of
  "ResNet strikes back", Wightman et al. 2021): ``AveragedModel(net, multi_avg_fn=
  get_ema_multi_avg_fn(decay), use_buffers=True)`` updated after every optimiser step. With
  ``use_buffers`` the BatchNorm running statistics are averaged too, so the EMA network is
  evaluated as it is (no recomputation).
* **SWA** (stochastic weight averaging; Izmailov et al. 2018): ``AveragedModel(net)`` (equal
  weights) updated at the end of every epoch from ``swa_start`` on, optionally with ``SWALR``'s
  constant learning rate; its BatchNorm statistics do not average, so ``update_bn`` recomputes
  them on the training images (no augmentation) before it is validated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn, update_bn

from zoo.preprocess import Preprocessing
from zoo.preprocess.adapter import full_model
from zoo.recipe import AveragingCfg


class Averager:
    """The averaged copy of a network and the rule that updates it."""

    def __init__(self, net: nn.Module, cfg: AveragingCfg, epochs: int, steps_per_epoch: int,
                 opt: torch.optim.Optimizer) -> None:
        self.cfg = cfg
        self.method = cfg.method
        if self.method == "ema":
            self.decay = cfg.ema_decay(steps_per_epoch)
            self.avg = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        else:
            self.decay = None
            self.avg = AveragedModel(net)
        self.swa_start = min(epochs - 1, int(cfg.swa_start * epochs))  # first averaged epoch (0-based)
        # SWALR leaves the learning rate as it is until its first step (end of the first averaged
        # epoch); from then on it holds it (``holds_lr``) and the recipe's scheduler stops stepping.
        self.swa_sched = SWALR(opt, cfg.swa_lr, anneal_epochs=1) if self.method == "swa" and cfg.swa_lr else None
        self.holds_lr = False

    @property
    def started(self) -> bool:
        """Whether the average holds anything yet (EMA: from the first step; SWA: from swa_start)."""
        return self.method == "ema" or int(self.avg.n_averaged) > 0

    def in_swa_phase(self, epoch: int) -> bool:
        return self.method == "swa" and epoch >= self.swa_start

    def after_step(self, net: nn.Module) -> None:
        if self.method == "ema":
            self.avg.update_parameters(net)

    def end_epoch(self, net: nn.Module, epoch: int, prep: Preprocessing, images: torch.Tensor,
                  batch_size: int) -> None:
        """SWA: average this epoch's weights and recompute the average's BatchNorm statistics."""
        if not self.in_swa_phase(epoch):
            return
        self.avg.update_parameters(net)
        batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        with torch.no_grad():
            update_bn(batches, full_model(self.avg.module, prep).to(images.device))
        if self.swa_sched is not None:
            self.swa_sched.step()
            self.holds_lr = True

    def describe(self, epochs_run: int) -> str:
        """What the saved weights are, for the card."""
        if self.method == "ema":
            return f"ema (decay {self.decay:.6g} per step, weights and BatchNorm buffers)"
        return f"swa (equal average of epochs {self.swa_start + 1}-{epochs_run}, BatchNorm recomputed)"

    def state_dict(self) -> dict[str, Any]:
        return {"avg": self.avg.state_dict(), "holds_lr": self.holds_lr,
                "swa_sched": self.swa_sched.state_dict() if self.swa_sched is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.avg.load_state_dict(state["avg"])
        self.holds_lr = bool(state.get("holds_lr", False))
        if self.swa_sched is not None and state.get("swa_sched") is not None:
            self.swa_sched.load_state_dict(state["swa_sched"])


def make_averager(net: nn.Module, cfg: AveragingCfg, epochs: int, steps_per_epoch: int,
                  opt: torch.optim.Optimizer) -> Averager | None:
    return None if cfg.method == "none" else Averager(net, cfg, epochs, steps_per_epoch, opt)


__all__ = ["Averager", "make_averager"]

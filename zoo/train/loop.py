"""The epoch loop: one pass over the training split, a validation pass, model selection.

Data stay in memory as uint8 tensors (on the GPU when there is one); each batch is indexed,
augmented and normalised as a whole. The best epoch is chosen on the validation split only.
What is validated, selected and saved is the *evaluated network* (:func:`eval_net`): the trained
one, or its EMA / SWA average when the recipe asks (:mod:`zoo.train.averaging`), seen through the
recipe's test-time augmentation — the very model the bundle will hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zoo.data import ArrayDataset, DataSplits
from zoo.inference import predict_logits
from zoo.metrics import compute_metrics
from zoo.models import create_model
from zoo.postprocess import to_probs
from zoo.preprocess import Preprocessing
from zoo.preprocess.adapter import full_model
from zoo.recipe import Recipe
from zoo.train.augment import augment
from zoo.train.averaging import Averager, make_averager
from zoo.train.checkpoint import Progress
from zoo.train.distributed import Dist, gather, mean, shard
from zoo.train.optim import build_optimizer, build_scheduler, compute_loss, num_outputs, penalty

# Called after every epoch with the epoch's row (epoch, losses, validation metrics). It may raise
# to stop the run (an Optuna pruner does); the snapshot of that epoch is already written.
EpochCallback = Callable[[dict[str, Any]], None]


@dataclass
class Session:
    """Everything one training run holds in memory."""

    recipe: Recipe
    splits: DataSplits
    prep: Preprocessing
    outputs: int  # logits of the head (1 for a single-logit binary head)
    device: torch.device
    use_amp: bool
    net: nn.Module
    model: nn.Module  # Sequential(InputAdapter, net), channels-last
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    sched: Any
    sched_when: str
    gen: torch.Generator
    train_x: torch.Tensor
    train_y: torch.Tensor
    sample_w: torch.Tensor | None
    averager: Averager | None = None
    dist: Dist | None = None  # several processes (torchrun): this one's rank
    train_model: nn.Module | None = None  # ``model`` wrapped in DistributedDataParallel under torchrun
    aug_gen: torch.Generator | None = None  # per-rank augmentation draws under torchrun (else ``gen``)

    @property
    def world(self) -> int:
        return self.dist.world if self.dist is not None else 1

    @classmethod
    def create(cls, recipe: Recipe, splits: DataSplits, prep: Preprocessing, device: torch.device,
               use_amp: bool, dist: Dist | None = None) -> Session:
        """Build the network (the registry's, with the recipe's pretrained weights), optimiser,
        scheduler and sampler of a run."""
        cfg = recipe.train
        outputs = num_outputs(recipe.loss, splits.num_classes)
        net = create_model(recipe.arch, num_classes=outputs, in_channels=prep.in_channels,
                           input_size=prep.input_size, pretrained=recipe.pretrained, **recipe.model_kwargs())
        # channels_last: oneDNN / cuDNN convolutions run faster on NHWC (≈ 25 % for the reports' CNNs)
        model = full_model(net, prep).to(device, memory_format=torch.channels_last)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = build_optimizer(params, recipe.optimizer)
        world = dist.world if dist is not None else 1
        steps = max(1, math.ceil(len(splits.train) / (cfg.batch_size * world)))
        steps = min(steps, cfg.max_batches or steps)
        sched, when = build_scheduler(opt, recipe.scheduler, cfg.epochs, steps, recipe.optimizer.lr)
        sample_w = None
        if cfg.balance:  # weight 1/count per class, drawn with replacement (WeightedRandomSampler)
            counts = torch.bincount(splits.train.labels, minlength=splits.num_classes).clamp_min(1)
            sample_w = (1.0 / counts.double())[splits.train.labels]
        averager = make_averager(net, recipe.averaging, cfg.epochs, steps, opt)
        s = cls(recipe, splits, prep, outputs, device, use_amp, net, model, params, opt, sched, when,
                torch.Generator().manual_seed(cfg.seed), splits.train.images.to(device),
                splits.train.labels.to(device), sample_w, averager, dist)
        s.train_model, s.aug_gen = model, s.gen
        if dist is not None:
            # gradients averaged over the ranks in backward; every rank draws its own augmentations
            # (the permutation, from ``gen``, stays the same on every rank)
            s.train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
            s.aug_gen = torch.Generator().manual_seed(cfg.seed * 1000 + dist.rank + 1)
        return s

    def snapshot(self, epoch: int, p: Progress, stopped: bool) -> dict[str, Any]:
        # the best weights are this epoch's own network most of the time: written once, not twice
        # (a snapshot of a 58M-parameter network is ~1 GB with Adam's moments)
        best_is_net = p.best_epoch == epoch + 1 and eval_net(self) is self.net
        return {
            "epoch": epoch, "net": self.net.state_dict(), "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict() if self.sched is not None else None,
            "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(), "history": p.history,
            "bad_epochs": p.bad_epochs, "best_score": p.best_score, "best_epoch": p.best_epoch,
            "best_state": None if best_is_net else p.best_state, "best_is_net": best_is_net, "stopped": stopped,
            "averager": self.averager.state_dict() if self.averager is not None else None,
            "aug_gen": self.aug_gen.get_state() if self.aug_gen is not self.gen else None,
        }

    def restore(self, snap: dict[str, Any]) -> None:
        self.net.load_state_dict(snap["net"])
        self.opt.load_state_dict(snap["opt"])
        if self.sched is not None and snap["sched"] is not None:
            self.sched.load_state_dict(snap["sched"])
        self.gen.set_state(snap["gen"])
        torch.set_rng_state(snap["torch_rng"])
        if self.averager is not None and snap.get("averager") is not None:
            self.averager.load_state_dict(snap["averager"])
        if self.aug_gen is not self.gen and snap.get("aug_gen") is not None:
            self.aug_gen.set_state(snap["aug_gen"])


def eval_net(s: Session) -> nn.Module:
    """The network a run validates, selects and saves: the EMA / SWA average once it holds
    something, else the trained network itself."""
    if s.averager is not None and s.averager.started:
        return s.averager.avg.module
    return s.net


def eval_model(s: Session, net: nn.Module | None = None) -> nn.Module:
    """``net`` (default :func:`eval_net`) as the bundle will hold it: adapter, network, TTA."""
    return full_model(net if net is not None else eval_net(s), s.prep, s.recipe.tta).to(s.device)


def train_epoch(s: Session) -> float:
    """One pass over the training split; returns the mean training loss (over every rank's images).

    Under torchrun the global batch is ``batch_size × world`` consecutive images of the permutation
    every rank draws alike, and each rank trains on its contiguous shard of it."""
    cfg, n, world = s.recipe.train, len(s.train_y), s.world
    model = s.train_model or s.model
    model.train()
    if s.sample_w is not None:
        order = torch.multinomial(s.sample_w, n, replacement=True, generator=s.gen)
    else:
        order = torch.randperm(n, generator=s.gen)
    order = order.to(s.device)
    total, seen = 0.0, 0
    step = cfg.batch_size * world
    if cfg.max_batches is not None:
        n = min(n, cfg.max_batches * step)
    for i in range(0, n, step):
        batch = order[i : i + step]
        if len(batch) < 2 * world and i > 0:  # BatchNorm cannot train on one sample (per rank)
            continue
        idx = shard(batch, s.dist)
        loss = _step(s, model, idx)
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
    return mean(total / max(seen, 1), s.dist)


def _step(s: Session, model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Forward, backward and optimiser step on the images ``idx``; returns the loss."""
    cfg = s.recipe.train
    x = augment(s.train_x[idx].float().div_(255), s.recipe.augment, s.aug_gen or s.gen, s.splits.name)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.use_amp):
        logits = model(x)
    loss = compute_loss(logits.float(), s.train_y[idx], s.recipe.loss)
    pen = penalty(s.net, s.recipe.loss)
    s.opt.zero_grad(set_to_none=True)
    (loss if pen is None else loss + pen).backward()
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(s.params, cfg.grad_clip)
    s.opt.step()
    if s.averager is not None:
        s.averager.after_step(s.net)
    if s.sched is not None and s.sched_when == "batch" and not (s.averager and s.averager.holds_lr):
        s.sched.step()
    return loss


def evaluate(s: Session, ds: ArrayDataset, model: nn.Module | None = None) -> tuple[float, dict[str, Any],
                                                                                    torch.Tensor]:
    """Loss, metrics and logits on a split of ``model`` (default: :func:`eval_model`). Under torchrun
    each rank runs its shard and the logits are gathered: every rank gets the same numbers."""
    model = model if model is not None else eval_model(s)
    images = ds.images if s.dist is None else ds.images[shard(torch.arange(len(ds)), s.dist)]
    logits = gather(predict_logits(model, images, s.recipe.train.eval_batch_size, s.device), s.dist)
    loss = float(compute_loss(logits, ds.labels, s.recipe.loss))
    return loss, compute_metrics(ds.labels.numpy(), to_probs(logits.numpy()), s.splits.labels), logits


def selection_score(metrics: dict[str, Any], loss: float, metric: str, epoch: int = 0) -> float:
    """The validation score an epoch is selected by (higher is better); ``last``: the epoch itself."""
    if metric == "last":
        return float(epoch)
    value = -loss if metric == "loss" else metrics[metric]
    return -math.inf if math.isnan(value) else value


def end_epoch(s: Session, p: Progress, epoch: int, train_loss: float) -> dict[str, Any]:
    """Averaging, validation, model selection and the scheduler step after epoch ``epoch`` (0-based)."""
    if s.averager is not None:
        s.averager.end_epoch(s.net, epoch, s.prep, s.train_x, s.recipe.train.eval_batch_size)
    val_loss, val, _ = evaluate(s, s.splits.val)
    row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val["acc"],
           "val_auc": val["auc"], "val_macro_f1": val["macro_f1"], "lr": s.opt.param_groups[0]["lr"]}
    p.history.append(row)
    score = selection_score(val, val_loss, s.recipe.train.early_stopping.metric, epoch)
    if score > p.best_score or p.best_state is None:  # an undefined score (NaN AUC) still keeps epoch 1
        p.best_score, p.best_epoch, p.bad_epochs = score, epoch + 1, 0
        p.best_state = {k: v.detach().clone() for k, v in eval_net(s).state_dict().items()}
    else:
        p.bad_epochs += 1
    _step_scheduler(s, score)
    p.next_epoch = epoch + 1
    return row


def _step_scheduler(s: Session, score: float) -> None:
    """The per-epoch scheduler step (per-batch ones step in :func:`train_epoch`); none once SWALR
    holds the learning rate."""
    if s.sched is None or (s.averager is not None and s.averager.holds_lr):
        return
    if s.sched_when == "epoch":
        s.sched.step()
    elif s.sched_when == "metric":
        s.sched.step(score)


__all__ = ["EpochCallback", "Session", "end_epoch", "eval_model", "eval_net", "evaluate", "selection_score",
           "train_epoch"]

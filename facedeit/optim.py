"""Optimizer, lr schedule and loss for a resolved recipe, from timm's factories."""

import math

import torch
from torch import nn

from facedeit.recipes import Resolved


def build_optimizer(model: nn.Module, run: Resolved) -> torch.optim.Optimizer:
    """timm's create_optimizer_v2 at the resolved lr.

    With `no_decay_bias_norm`, 1-D parameters (biases, norm weights, LayerScale
    gains) and the names in `model.no_weight_decay()` (position embedding, cls
    token) get no weight decay.
    """
    from timm.optim import create_optimizer_v2

    opt = run.recipe.optimizer
    if opt.name == "adamw":
        name, extra = "adamw", {"eps": opt.eps, "betas": opt.betas}
    else:
        # timm's "momentum" is torch SGD with momentum; "nesterov" adds Nesterov momentum.
        name, extra = ("nesterov" if opt.nesterov else "momentum"), {}
    # timm groups a module's parameters and always exempts model.no_weight_decay();
    # a plain parameter list keeps one group with decay on every tensor, as
    # torch.optim.AdamW(model.parameters()) does.
    return create_optimizer_v2(
        model if opt.no_decay_bias_norm else list(model.parameters()),
        opt=name,
        lr=run.lr,
        weight_decay=opt.weight_decay,
        momentum=opt.momentum,
        filter_bias_and_bn=opt.no_decay_bias_norm,
        **extra,
    )


def schedule_lengths(run: Resolved, steps_per_epoch: int) -> dict[str, int]:
    """Convert the epoch lengths of the schedule into optimizer updates."""
    total = run.epochs * steps_per_epoch
    warmup = math.ceil(run.warmup_epochs * steps_per_epoch)
    lengths = {"total_updates": total, "warmup_updates": warmup}
    if run.step_epochs is not None:
        lengths["step_updates"] = max(1, round(run.step_epochs * steps_per_epoch))
    return lengths


def build_scheduler(optimizer: torch.optim.Optimizer, run: Resolved, steps_per_epoch: int):
    """Build a timm scheduler that is stepped once per update with `step_update(updates_done)`.

    Warmup is counted in updates and starts at the first one, so update 0 runs
    at `warmup_lr` and update `warmup_updates` at the full lr. deit's main.py
    steps its scheduler with the epoch index instead, which starts the warmup
    one epoch late. The decay runs over the updates after the warmup.
    """
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    schedule = run.recipe.schedule
    lengths = schedule_lengths(run, steps_per_epoch)
    warmup = lengths["warmup_updates"]
    common = dict(warmup_t=warmup, warmup_lr_init=schedule.warmup_lr, warmup_prefix=True, t_in_epochs=False)
    if schedule.name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(1, lengths["total_updates"] - warmup),
                                 lr_min=schedule.min_lr, **common)
    if schedule.name == "step":
        return StepLRScheduler(optimizer, decay_t=lengths["step_updates"], decay_rate=schedule.gamma, **common)
    # constant: a step schedule that never decays
    return StepLRScheduler(optimizer, decay_t=lengths["total_updates"] + 1, decay_rate=1.0, **common)


def build_train_loss(run: Resolved) -> nn.Module:
    """SoftTargetCrossEntropy under mixup (smoothing is then in the targets),
    LabelSmoothingCrossEntropy with label smoothing, else plain cross-entropy."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if run.recipe.mixup_active:
        return SoftTargetCrossEntropy()
    if run.recipe.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=run.recipe.label_smoothing)
    return nn.CrossEntropyLoss()

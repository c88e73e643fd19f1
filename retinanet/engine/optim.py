"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from ..choices import check_choice

if TYPE_CHECKING:  # the config's schema imports the choices below
    from ..config import Config

OptimizerName = Literal["sgd", "adamw"]
OptimizerImpl = Literal["auto", "fused", "foreach", "for_loop"]
LrSchedule = Literal["step", "cosine"]

_NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(model: nn.Module, weight_decay: float, weight_decay_norm: float) -> list[dict]:
    """Trainable parameters split into two groups: those of normalisation layers get
    `weight_decay_norm` (0 by default: decaying a norm's scale towards 0 fights the
    normalisation), all others `weight_decay`."""
    norm_params, other_params = [], []
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (norm_params if isinstance(module, _NORM_TYPES) else other_params).append(param)
    groups = [{"params": other_params, "weight_decay": weight_decay}]
    if norm_params:
        groups.append({"params": norm_params, "weight_decay": weight_decay_norm})
    return groups


def create_optimizer(
    model: nn.Module,
    name: OptimizerName,
    lr: float,
    weight_decay: float,
    weight_decay_norm: float = 0.0,
    momentum: float = 0.9,
    adam_betas: Sequence[float] = (0.9, 0.999),
    implementation: OptimizerImpl = "auto",
) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters (see `parameter_groups`).

    implementation: "fused" (one kernel for all parameters, and with a GradScaler no host sync
    to check for overflow), "foreach" (a few multi-tensor kernels), "for_loop" (one parameter
    at a time) or "auto": fused where this PyTorch has it for the parameters' device, else
    foreach. All give the same update up to float rounding."""
    check_choice(name, OptimizerName, "optimizer")
    check_choice(implementation, OptimizerImpl, "optimizer implementation")
    groups = parameter_groups(model, weight_decay, weight_decay_norm)
    if name == "sgd":
        optimizer_class, kwargs = torch.optim.SGD, {"lr": lr, "momentum": momentum}
    else:
        optimizer_class, kwargs = torch.optim.AdamW, {"lr": lr, "betas": tuple(adam_betas)}
    if implementation in ("auto", "fused"):
        try:
            return optimizer_class(groups, **kwargs, fused=True)
        except (RuntimeError, TypeError) as err:
            # TypeError: a PyTorch without `fused` for this optimizer; RuntimeError: not for
            # this device.
            if implementation == "fused":
                raise ValueError(f"train.optimizer_impl=fused: {err}") from err
    return optimizer_class(groups, **kwargs, foreach=implementation != "for_loop")


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer the train.* keys describe, at the linearly scaled learning rate
    train.base_lr * train.batch_size / train.reference_batch_size."""
    train = cfg.train
    lr = train.base_lr * train.batch_size / train.reference_batch_size
    return create_optimizer(
        model,
        train.optimizer,
        lr,
        train.weight_decay,
        train.weight_decay_norm,
        train.momentum,
        train.adam_betas,
        train.optimizer_impl,
    )


def optimizer_implementation(optimizer: torch.optim.Optimizer) -> str:
    """'fused', 'foreach' or 'for_loop': which kernels `optimizer` runs (each parameter group
    decides for itself; ours all agree)."""
    group = optimizer.param_groups[0]
    if group.get("fused"):
        return "fused"
    return "foreach" if group.get("foreach") else "for_loop"


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, keeping the kernels this run chose: the saved parameter groups
    carry the `fused`/`foreach` flags of the run that wrote them (another machine, another
    train.optimizer_impl), and loading would silently switch to those."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for key in ("fused", "foreach"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]


def lr_factor(
    iteration: int,
    max_iter: int,
    schedule: LrSchedule = "step",
    steps: Sequence[int] = (),
    decay: float = 0.1,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
) -> float:
    """Multiplier of the base learning rate at `iteration` (0-based): a linear warmup from
    `warmup_factor` to 1 over `warmup_iters`, times a step schedule (x `decay` at each of
    `steps`) or a half-cosine decay to 0 at `max_iter`."""
    if schedule == "step":
        factor = decay ** bisect.bisect_right(sorted(steps), iteration)
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(iteration, max_iter) / max_iter))
    else:
        check_choice(schedule, LrSchedule, "lr schedule")
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def create_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    max_iter: int,
    schedule: LrSchedule,
    steps: Sequence[int],
    decay: float,
    warmup_iters: int,
    warmup_factor: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda it: lr_factor(it, max_iter, schedule, steps, decay, warmup_iters, warmup_factor),
    )


def build_lr_scheduler(
    cfg: Config, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule the train.* keys describe, stepped once per iteration."""
    t = cfg.train
    return create_lr_scheduler(
        optimizer,
        t.max_iter,
        t.lr_schedule,
        t.lr_steps,
        t.lr_decay,
        t.warmup_iters,
        t.warmup_factor,
    )

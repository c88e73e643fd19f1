"""One training step and the network it runs on: the device and precision, the network wrapped
for DistributedDataParallel and torch.compile, and forward, loss, backward and update with a
single wait for the device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ..data.collate import Batch
from ..model.retinanet import RetinaNet
from .distributed import get_world_size, init_distributed
from .precision import AmpMode, autocast, resolve_amp

# What a step whose loss is NaN or infinite does: stop the run, or skip the update.
OnNonFinite = Literal["stop", "skip"]


class NonFiniteLossError(RuntimeError):
    """Training stopped because a loss term became NaN or infinite."""


def agree_to_go_on(loss: Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """(is the loss finite on every process, has any process been asked to stop), with one
    host sync per iteration: both counts travel in one number through one all_reduce. Every
    process must take the same branch, or DDP's gradient all-reduce deadlocks. (A sum is
    finite iff all its terms are.)"""
    world = get_world_size()
    # finite processes + (world + 1) * stopping processes
    code = torch.isfinite(loss.detach()).to(torch.float64) + float((world + 1) * stop_requested)
    if world > 1:
        torch.distributed.all_reduce(code)
    value = int(code.item())
    return value % (world + 1) == world, value // (world + 1) > 0


@dataclass
class StepParts:
    """What one training step touches. `model` is the RetinaNet itself, `forward_model` the
    module that runs its forward (the model, or its DistributedDataParallel wrapper)."""

    model: torch.nn.Module
    forward_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    amp: str
    device: torch.device
    scaler: torch.amp.GradScaler | None = None
    clip_grad_norm: float = 0.0
    # True once this process has been asked to stop (SIGTERM/SIGINT): see `StopSignals`
    stop_requested: Callable[[], bool] = lambda: False


class StepResult(NamedTuple):
    """losses: the loss terms (on the device); taken: False when the loss was not finite on
    some process and nothing was updated; stop: some process was asked to stop, and this is
    the last step (all processes agree)."""

    losses: dict[str, Tensor]
    taken: bool
    stop: bool = False


def train_step(parts: StepParts, batch: Batch, progress: float) -> StepResult:
    """Forward, loss, backward and optimizer step on a batch already on the device.

    The check that the loss is finite everywhere (and whether to stop) is the step's only
    wait for the device (see tests/engine/test_host_syncs.py); everything else is queued
    asynchronously."""
    # Gradients of the previous step are freed before the forward, not held through its peak.
    parts.optimizer.zero_grad(set_to_none=True)
    with autocast(parts.amp, parts.device):
        outputs = parts.forward_model(batch.images, batch.image_sizes)
    losses = parts.model.losses(outputs, batch.targets, progress=progress)
    loss = losses["loss_cls"] + losses["loss_box"]
    losses = {"loss": loss, **losses}
    finite, stop = agree_to_go_on(loss, parts.stop_requested())
    if not finite:
        return StepResult(losses, False, stop)
    scaler = parts.scaler
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if parts.clip_grad_norm > 0:
        if scaler is not None:
            scaler.unscale_(parts.optimizer)
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), parts.clip_grad_norm)
    if scaler is not None:
        scaler.step(parts.optimizer)
        scaler.update()
    else:
        parts.optimizer.step()
    return StepResult(losses, True, stop)


def setup_device(
    device: str, amp: AmpMode | None, cudnn_benchmark: bool
) -> tuple[torch.device, AmpMode | None]:
    """This process's device (joining the process group under torchrun) and the resolved
    autocast choice (None for fp32, 'bf16' or 'fp16'); an impossible choice fails here, before
    any data is read."""
    torch_device = init_distributed(device)
    amp = resolve_amp(amp, torch_device)
    # cudnn.benchmark times the convolution algorithms for each new input shape once and keeps
    # the fastest: a gain when shapes repeat (fixed-size or few multi-scale sizes), a loss when
    # every batch has a new shape.
    torch.backends.cudnn.benchmark = cudnn_benchmark
    return torch_device, amp


def wrap_distributed(
    model: torch.nn.Module, device: torch.device, broadcast_buffers: bool = False
) -> torch.nn.Module:
    """`ddp_model(model, ...)` when there are several processes, else `model`."""
    return model if get_world_size() == 1 else ddp_model(model, device, broadcast_buffers)


def ddp_model(
    model: torch.nn.Module, device: torch.device, broadcast_buffers: bool = False
) -> DistributedDataParallel:
    """DistributedDataParallel around `model`. Gradients live in DDP's communication buckets
    (gradient_as_bucket_view: no copy in and out of the buckets, less memory); buffers are not
    broadcast before every forward unless asked (frozen BatchNorm's never change, and a
    broadcast per step costs a collective)."""
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=broadcast_buffers,
        gradient_as_bucket_view=True,
    )


def compile_network(model: RetinaNet, backend: str = "inductor") -> RetinaNet:
    """torch.compile the backbone, FPN and head in place (parameter names unchanged, so
    checkpoints are the same). The loss stays eager: it changes with the training progress
    (gamma schedules) and would recompile. Image sizes that vary make the compiler switch to
    dynamic shapes after the first new size instead of compiling one graph per size."""
    for part in (model.backbone, model.fpn, model.head):
        part.compile(backend=backend)
    return model

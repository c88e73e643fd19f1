"""The training loop: iteration-based (the paper's and Detectron's schedules are in iterations),
single process or DistributedDataParallel under torchrun, resumable exactly."""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import Config, ConfigError, config_differences, config_to_yaml
from ..data import build_train_loader
from ..data.build import build_dataset, resolve_data_paths
from ..data.collate import Batch, raise_on_bad_images
from ..model.build import build_model
from ..model.retinanet import RetinaNet
from .checkpoint import (
    FINAL_CHECKPOINT,
    ClassInfo,
    checkpoint_classes,
    checkpoint_config,
    find_last_checkpoint,
    load_checkpoint,
    load_initial_weights,
    load_model_weights,
    load_resume_checkpoint,
    mark_last_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from .device import configure_cudnn, device_name
from .distributed import (
    barrier,
    broadcast_from_main,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    main_process_first,
    reduce_mean,
)
from .evaluation import CocoMetrics
from .files import atomic_write_text, json_safe
from .inference import evaluate_model
from .optim import build_lr_scheduler, load_optimizer_state, optimizer_from_config
from .precision import autocast, grad_scaler, resolve_amp
from .signals import StopSignals, TrainingInterrupted

METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """Training stopped because a loss term became NaN or infinite."""


@dataclass
class TrainResult:
    output_dir: Path
    final_checkpoint: Path | None
    iterations: int
    metrics: CocoMetrics | None
    skipped_steps: int = 0


class MetricsLog:
    """One JSON line per log step in metrics.jsonl, mirrored to TensorBoard (rank 0 only)."""

    def __init__(self, output_dir: Path, start_iter: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = output_dir / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            # After a resume, lines written past the checkpoint belong to the interrupted run;
            # a line cut short by the crash is dropped too.
            kept = []
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    if json.loads(line).get("iteration", 0) <= start_iter:
                        kept.append(line)
                except (json.JSONDecodeError, AttributeError):
                    warnings.warn(
                        f"{self.path}:{number}: dropping an unreadable line", stacklevel=2
                    )
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_iter + 1)

    def write(self, iteration: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"iteration": iteration, **json_safe(dict(values))}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _agree_to_go_on(loss: Tensor, stop_requested: bool) -> tuple[bool, bool]:
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
    finite, stop = _agree_to_go_on(loss, parts.stop_requested())
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


def setup_device(device: str, amp: str, cudnn_benchmark: bool) -> tuple[torch.device, str]:
    """This process's device (joining the process group under torchrun) and the resolved
    autocast choice ('', 'bf16' or 'fp16'); an impossible choice fails here, before any data
    is read."""
    torch_device = init_distributed(device)
    amp = resolve_amp(amp, torch_device)
    configure_cudnn(cudnn_benchmark)
    return torch_device, amp


def wrap_distributed(
    model: torch.nn.Module, device: torch.device, broadcast_buffers: bool = False
) -> torch.nn.Module:
    """`ddp_model(model, ...)` when there are several processes, else `model`."""
    if get_world_size() == 1:
        return model
    return ddp_model(model, device, broadcast_buffers)


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


def train(
    cfg: Config,
    output_dir: str | Path,
    resume: bool = False,
    device: str = "auto",
    stop_at_iteration: int | None = None,
    progress: bool = True,
    evaluate: bool = True,
) -> TrainResult:
    """Train a RetinaNet as `cfg` says, writing checkpoints, metrics.jsonl, TensorBoard scalars,
    config.yaml and (with `evaluate`) the final COCO evaluation into `output_dir`.

    resume: continue from the last checkpoint in `output_dir` (a fresh start if there is none).
        With several nodes the folder must be on a filesystem they share: rank 0 chooses the
        checkpoint and every process loads it.
    stop_at_iteration: stop after this many iterations as if interrupted (no final checkpoint,
        no evaluation): for time-boxed jobs and for testing resume.
    """
    output_dir = Path(output_dir)
    torch_device, amp = setup_device(device, cfg.train.amp, cfg.train.cudnn_benchmark)
    if is_main_process() and progress:
        print(
            f"training on {torch_device} ({device_name(torch_device)}) in {amp or 'fp32'} "
            f"(train.amp={cfg.train.amp or chr(39) * 2}), {get_world_size()} process(es)"
        )
    check_trainable(cfg)
    world_size, rank = get_world_size(), get_rank()
    if cfg.train.batch_size % world_size:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by "
            f"the {world_size} processes"
        )
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
    cfg = main_process_first(lambda: resolve_data_paths(cfg))

    train_set = build_dataset(cfg, "train", training=True)
    classes = ClassInfo(train_set.class_names, train_set.category_ids)
    checkpoint_path, state = None, None
    if resume:
        # Rank 0 chooses (skipping a torn newest checkpoint); every process loads its choice.
        if is_main_process():
            checkpoint_path, state = load_resume_checkpoint(output_dir)
        checkpoint_path = broadcast_from_main(checkpoint_path)
        if checkpoint_path is not None and not is_main_process():
            if not Path(checkpoint_path).is_file():
                raise FileNotFoundError(
                    f"process {rank} cannot read {checkpoint_path}: resuming needs --output-dir "
                    "on a filesystem shared by all nodes"
                )
            state = load_checkpoint(checkpoint_path)

    torch.manual_seed(cfg.train.seed)
    init_weights = cfg.train.init_weights if state is None else ""
    model = build_model(
        cfg, classes.num_classes, load_backbone_weights=state is None and not init_weights
    )
    if init_weights:
        loaded_classes = load_initial_weights(model, init_weights, classes)
        if is_main_process():
            detail = "" if loaded_classes else " (other classes: new class output layer)"
            print(f"initialised from {init_weights}{detail}")
    model.to(torch_device)
    if cfg.train.channels_last:
        model.use_channels_last()
    optimizer = optimizer_from_config(cfg.train, model)
    scheduler = build_lr_scheduler(
        optimizer,
        cfg.train.max_iter,
        cfg.train.lr_schedule,
        cfg.train.lr_steps,
        cfg.train.lr_decay,
        cfg.train.warmup_iters,
        cfg.train.warmup_factor,
    )
    scaler = grad_scaler(amp, torch_device)

    start_iter = 0
    if state is not None:
        if checkpoint_classes(state) != classes:
            raise ValueError(
                f"{checkpoint_path} was trained on classes {checkpoint_classes(state).names}, but "
                f"{cfg.data.train.annotation_file} defines {classes.names}"
            )
        changed = config_differences(checkpoint_config(state), cfg)
        if changed and is_main_process():
            print(
                f"warning: resuming with a config that differs from the checkpoint's in {changed}"
            )
        load_model_weights(model, state, checkpoint_path)
        load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_iter = int(state["iteration"])
        if is_main_process():
            print(f"resuming from {checkpoint_path} at iteration {start_iter}")
        del state

    if is_main_process():
        atomic_write_text(output_dir / "config.yaml", config_to_yaml(cfg))
    if cfg.train.compile:
        compile_network(model)
    step_parts = StepParts(
        model,
        wrap_distributed(model, torch_device, cfg.train.ddp_broadcast_buffers),
        optimizer,
        amp,
        torch_device,
        scaler,
        cfg.train.clip_grad_norm,
    )
    loader = build_train_loader(
        train_set,
        batch_size=cfg.train.batch_size // world_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.train.seed,
        start_iter=start_iter,
        rank=rank,
        world_size=world_size,
        aspect_ratio_grouping=cfg.data.aspect_ratio_grouping,
        size_divisibility=cfg.input.size_divisibility,
        pin_memory=torch_device.type == "cuda",
    )
    log = MetricsLog(output_dir, start_iter, enabled=is_main_process())
    val_set = None

    def save(iteration: int, name: str | None = None, training_state: bool = True) -> Path | None:
        path = None
        if is_main_process():
            path = save_checkpoint(
                output_dir / (name or f"model_{iteration:07d}.pth"),
                model,
                cfg,
                classes,
                iteration,
                optimizer if training_state else None,
                scheduler if training_state else None,
                scaler if training_state else None,
            )
            if training_state:
                mark_last_checkpoint(output_dir, path)
                remove_old_checkpoints(output_dir, cfg.train.keep_checkpoints)
        barrier()
        return path

    def run_evaluation(iteration: int, final: bool) -> CocoMetrics:
        nonlocal val_set
        if val_set is None:
            val_set = build_dataset(cfg, "val", training=False)
        metrics = evaluate_model(
            model,
            val_set,
            classes,
            torch_device,
            output_dir=output_dir / ("eval" if final else f"eval_{iteration:07d}"),
            batch_size=cfg.eval.batch_size,
            num_workers=cfg.data.num_workers,
            size_divisibility=cfg.input.size_divisibility,
            backend=cfg.eval.backend,
            amp=amp,
            verbose=final,
        )
        log.write(iteration, {f"eval/{k}": v for k, v in metrics.summary_numbers().items()})
        return metrics

    max_iter = cfg.train.max_iter
    end_iter = max_iter if stop_at_iteration is None else min(max_iter, stop_at_iteration)
    bar = tqdm(
        total=max_iter,
        initial=start_iter,
        disable=not (progress and is_main_process()),
        dynamic_ncols=True,
    )
    model.train()
    data_iter = iter(loader)
    skipped_images: set[str] = set()
    signals = StopSignals().__enter__()

    def save_finished(done: int) -> None:
        """Checkpoint `done` finished iterations before stopping early, unless the periodic
        checkpoint (or the one resumed from) already holds them."""
        if done > start_iter and done % cfg.train.checkpoint_period:
            save(done)

    def stop_after(done: int) -> None:
        """Checkpoint `done` finished iterations and stop on the signal received."""
        save_finished(done)
        last = find_last_checkpoint(output_dir) if is_main_process() else "a checkpoint"
        raise TrainingInterrupted(
            f"stopped by {signals.name} after iteration {done}; last checkpoint: {last or 'none'}; "
            "run again with --resume to continue",
            signals.received or signal.SIGTERM,
        )

    step_parts.stop_requested = signals.requested
    skipped = 0
    # Loss terms summed on the device over the logging window (no host sync per iteration).
    window_sums: dict[str, torch.Tensor] = {}
    window_start, window_steps, window_iters, data_time = time.perf_counter(), 0, 0, 0.0
    try:
        for iteration in range(start_iter, end_iter):
            fetch_start = time.perf_counter()
            try:
                batch = next(data_iter)
            except Exception:
                # A SIGTERM sent to the whole job also ends the loader's workers: stop as asked.
                if not signals.requested():
                    raise
                stop_after(iteration)
            if batch.bad_images:
                save_finished(iteration)
                raise_on_bad_images(
                    batch,
                    f"stopped before iteration {iteration + 1} (last checkpoint: "
                    f"{find_last_checkpoint(output_dir) or 'none'}); fix or remove the file, or "
                    "set data.on_bad_image=skip, and run again with --resume",
                )
            skipped_images.update(batch.skipped_images)
            batch = batch.to(torch_device, non_blocking=True)
            data_time += time.perf_counter() - fetch_start

            losses, finite, stop = train_step(step_parts, batch, progress=iteration / max_iter)
            if finite:
                for name, value in losses.items():
                    window_sums[name] = window_sums.get(name, 0) + value.detach()
                window_iters += 1
            elif cfg.train.on_nonfinite == "stop":
                bad = [
                    k for k, v in losses.items() if k.startswith("loss_") and not torch.isfinite(v)
                ]
                last = find_last_checkpoint(output_dir) if is_main_process() else None
                values = {k: float(v.detach()) for k, v in losses.items()}
                raise NonFiniteLossError(
                    f"non-finite {', '.join(bad) or 'loss on another process'} at iteration "
                    f"{iteration + 1} (values: {values}); "
                    f"nothing was saved for this iteration; last checkpoint: {last or 'none'}. "
                    "Lower train.base_lr, enable train.clip_grad_norm, or set "
                    "train.on_nonfinite=skip to skip such steps."
                )
            else:
                skipped += 1
            scheduler.step()
            bar.update(1)
            window_steps += 1

            done = iteration + 1
            if done % cfg.train.log_period == 0 or done == end_iter:
                values = {}
                if window_iters:
                    values = reduce_mean({k: v / window_iters for k, v in window_sums.items()})
                seconds_per_iter = (time.perf_counter() - window_start) / window_steps
                values.update(
                    lr=optimizer.param_groups[0]["lr"],
                    time=seconds_per_iter,
                    data_time=data_time / window_steps,
                    eta_seconds=seconds_per_iter * (max_iter - done),
                )
                if torch_device.type == "cuda":
                    values["max_memory_mib"] = torch.cuda.max_memory_allocated(torch_device) / 2**20
                if skipped:
                    values["skipped_steps"] = skipped
                if skipped_images:
                    values["skipped_images"] = len(skipped_images)
                log.write(done, values)
                if "loss" in values:
                    bar.set_postfix(
                        loss=f"{values['loss']:.3f}",
                        cls=f"{values['loss_cls']:.3f}",
                        box=f"{values['loss_box']:.3f}",
                        lr=f"{values['lr']:.2e}",
                    )
                window_sums = {}
                window_start, window_steps, window_iters, data_time = time.perf_counter(), 0, 0, 0.0
            if done % cfg.train.checkpoint_period == 0 and done < max_iter:
                save(done)
            if (
                evaluate
                and cfg.train.eval_period > 0
                and done % cfg.train.eval_period == 0
                and done < max_iter
            ):
                run_evaluation(done, final=False)
            if stop and done < end_iter:
                stop_after(done)
    finally:
        bar.close()
        signals.__exit__()

    if skipped_images and is_main_process():
        count = len(skipped_images)
        print(f"skipped {count} unreadable training image(s) (data.on_bad_image=skip):")
        for message in sorted(skipped_images):
            print(f"  {message}")
    if end_iter < max_iter:  # stopped early on request: as if interrupted
        log.close()
        return TrainResult(output_dir, None, end_iter, None, skipped)

    save(max_iter)
    final = save(max_iter, FINAL_CHECKPOINT, training_state=False)
    metrics = run_evaluation(max_iter, final=True) if evaluate else None
    log.close()
    return TrainResult(output_dir, final, max_iter, metrics, skipped)


def check_trainable(cfg: Config) -> None:
    """Training from scratch (no backbone weights, no train.init_weights) with frozen BatchNorm
    or frozen stages would freeze random weights: refuse, naming the keys to change."""
    backbone = cfg.model.backbone
    if backbone.weights or cfg.train.init_weights:
        return
    if backbone.norm == "frozen_bn" or backbone.freeze_at > 0:
        raise ConfigError(
            "model.backbone.weights is empty (training from scratch), but "
            f"model.backbone.norm={backbone.norm} and "
            f"model.backbone.freeze_at={backbone.freeze_at} "
            "would freeze randomly initialised layers; set model.backbone.norm=bn (or gn, sync_bn) "
            "and model.backbone.freeze_at=0, or give model.backbone.weights"
        )


def remove_old_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` periodic checkpoints (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    periodic = sorted(output_dir.glob("model_[0-9]*.pth"))
    for path in periodic[:-keep]:
        path.unlink(missing_ok=True)

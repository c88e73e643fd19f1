"""The training loop: iteration-based (the paper's and Detectron's schedules are in iterations),
single process or DistributedDataParallel under torchrun, resumable exactly."""

from __future__ import annotations

import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import Config, ConfigError, config_differences, config_to_yaml
from ..data.build import build_dataset, build_train_loader, resolve_data_paths
from ..data.classes import ClassInfo
from ..data.coco import CocoDetection
from ..data.collate import Batch, raise_on_bad_images
from ..files import atomic_write_json, atomic_write_text
from ..model.build import build_model
from ..model.retinanet import RetinaNet
from .best_model import BestModel
from .checkpoint import (
    BEST_CHECKPOINT,
    FINAL_CHECKPOINT,
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
from .coco_metrics import CocoMetrics
from .device import device_name
from .distributed import (
    barrier,
    broadcast_from_main,
    failures_shared,
    get_rank,
    get_world_size,
    is_main_process,
    main_process_first,
    run_on_main,
)
from .inference import evaluate_model
from .metrics_log import LogWindow, MetricsLog
from .optim import build_lr_scheduler, build_optimizer, load_optimizer_state
from .precision import grad_scaler
from .signals import StopSignals, TrainingInterrupted
from .step import (
    NonFiniteLossError,
    StepParts,
    compile_network,
    setup_device,
    train_step,
    wrap_distributed,
)

BEST_METRICS_FILE = "best_metrics.json"

__all__ = ["NonFiniteLossError", "TrainResult", "train"]


@dataclass
class TrainResult:
    output_dir: Path
    final_checkpoint: Path | None
    iterations: int
    metrics: CocoMetrics | None
    skipped_steps: int = 0
    best: BestModel | None = None


@failures_shared(clean_stops=(TrainingInterrupted,))
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
    config.yaml and (with `evaluate`) the final COCO evaluation into `output_dir`. With
    train.eval_period > 0 the best evaluated model is kept as model_best.pth (by
    train.best_metric) and train.early_stop_patience can end the run early.

    resume: continue from the last checkpoint in `output_dir` (a fresh start if there is none).
        With several nodes the folder must be on a filesystem they share: rank 0 chooses the
        checkpoint and every process loads it.
    stop_at_iteration: stop after this many iterations as if interrupted (no final checkpoint,
        no evaluation): for time-boxed jobs and for testing resume.
    """
    trainer = Trainer.set_up(cfg, Path(output_dir), resume, device, progress)
    return trainer.run(stop_at_iteration, evaluate)


@dataclass
class Trainer:
    """A training run's state between set-up and the end: what is saved in checkpoints
    (model, optimizer, scheduler, scaler, best model) and what is rebuilt (data, step parts)."""

    cfg: Config
    output_dir: Path
    device: torch.device
    amp: str
    classes: ClassInfo
    train_set: CocoDetection
    model: RetinaNet
    progress: bool
    start_iter: int = 0
    skipped_steps: int = 0
    skipped_images: set[str] = field(default_factory=set)
    stopped_early: bool = False
    val_set: CocoDetection | None = None

    def __post_init__(self) -> None:
        train = self.cfg.train
        self.best = BestModel(train.best_metric)  # replaced by the checkpoint's on resume
        self.optimizer = build_optimizer(self.cfg, self.model)
        self.scheduler = build_lr_scheduler(self.cfg, self.optimizer)
        self.scaler = grad_scaler(self.amp, self.device)

    # -- set-up ----------------------------------------------------------------------------

    @classmethod
    def set_up(
        cls, cfg: Config, output_dir: Path, resume: bool, device: str, progress: bool
    ) -> Trainer:
        """Device and precision, dataset, model (fresh, initialised or resumed), optimizer,
        step parts and loader; an impossible choice fails before any data is read."""
        torch_device, amp = setup_device(device, cfg.precision.amp, cfg.train.cudnn_benchmark)
        if is_main_process() and progress:
            print(
                f"training on {torch_device} ({device_name(torch_device)}) in {amp or 'fp32'} "
                f"(precision.amp={cfg.precision.amp or 'null'}), {get_world_size()} process(es)"
            )
        check_trainable(cfg)
        if cfg.train.batch_size % get_world_size():
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} is not divisible by "
                f"the {get_world_size()} processes"
            )
        if is_main_process():
            output_dir.mkdir(parents=True, exist_ok=True)
        cfg = main_process_first(lambda: resolve_data_paths(cfg))
        train_set = build_dataset(cfg, "train", training=True)
        classes = ClassInfo(train_set.class_names, train_set.category_ids)
        checkpoint_path, state = read_resume_state(output_dir) if resume else (None, None)
        torch.manual_seed(cfg.train.seed)
        model = build_training_model(cfg, classes, fresh=state is None)
        model.to(torch_device)
        if cfg.precision.channels_last:
            model.use_channels_last()
        trainer = cls(cfg, output_dir, torch_device, amp, classes, train_set, model, progress)
        if state is not None:
            trainer.restore(state, checkpoint_path)
        trainer.prepare_to_run()
        return trainer

    def restore(self, state: dict[str, Any], checkpoint_path: Path) -> None:
        """Continue from a checkpoint of this run: weights, optimizer, schedule, scaler, RNG,
        iteration and the best model so far."""
        if checkpoint_classes(state) != self.classes:
            raise ValueError(
                f"{checkpoint_path} was trained on classes {checkpoint_classes(state).names}, but "
                f"{self.cfg.data.train.annotation_file} defines {self.classes.names}"
            )
        changed = config_differences(checkpoint_config(state), self.cfg)
        if changed and is_main_process():
            print(
                f"warning: resuming with a config that differs from the checkpoint's in {changed}"
            )
        load_model_weights(self.model, state, checkpoint_path)
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        if "best" in state:
            self.best = BestModel(**state["best"])
            self.best.metric = self.cfg.train.best_metric
        self.start_iter = int(state["iteration"])
        if is_main_process():
            print(f"resuming from {checkpoint_path} at iteration {self.start_iter}")

    def prepare_to_run(self) -> None:
        """config.yaml, compilation, the step's parts, the loader from `start_iter` and the log."""
        cfg = self.cfg
        if is_main_process():
            atomic_write_text(self.output_dir / "config.yaml", config_to_yaml(cfg))
        if cfg.train.compile:
            compile_network(self.model)
        self.step_parts = StepParts(
            self.model,
            wrap_distributed(self.model, self.device, cfg.train.ddp_broadcast_buffers),
            self.optimizer,
            self.amp,
            self.device,
            self.scaler,
            cfg.train.clip_grad_norm,
        )
        self.loader = build_train_loader(
            cfg, self.train_set, self.start_iter, get_rank(), get_world_size(), self.device
        )
        self.log = MetricsLog(self.output_dir, self.start_iter, enabled=is_main_process())

    # -- the loop --------------------------------------------------------------------------

    def run(self, stop_at_iteration: int | None, evaluate: bool) -> TrainResult:
        """Train from `start_iter` to train.max_iter (or `stop_at_iteration`, or an early
        stop), then write the final checkpoint and evaluate."""
        max_iter = self.cfg.train.max_iter
        end_iter = max_iter if stop_at_iteration is None else min(max_iter, stop_at_iteration)
        # A run that stopped early and is resumed only redoes its end.
        self.stopped_early = evaluate and self.best.exhausted(self.cfg.train.early_stop_patience)
        done = self.start_iter
        show = self.progress and is_main_process()
        with tqdm(total=max_iter, initial=done, disable=not show, dynamic_ncols=True) as bar:
            if not self.stopped_early:
                self.model.train()
                # Loader workers start before our signal handlers exist, so they keep the
                # default SIGTERM, by which the training process ends them when it exits.
                data_iter = iter(self.loader)
                with StopSignals() as signals:
                    self.step_parts.stop_requested = signals.requested
                    done = self.loop(data_iter, end_iter, evaluate, signals, bar)
        self.report_skipped_images()
        if done < max_iter and not self.stopped_early:  # stopped on request: as if interrupted
            self.log.close()
            return TrainResult(self.output_dir, None, done, None, self.skipped_steps, self.best)
        return self.finish(done, evaluate)

    def loop(
        self, data_iter: Any, end_iter: int, evaluate: bool, signals: StopSignals, bar: tqdm
    ) -> int:
        """Iterations start_iter..end_iter - 1; returns how many are done (fewer after an
        early stop)."""
        train = self.cfg.train
        window = LogWindow()
        done = self.start_iter
        for iteration in range(self.start_iter, end_iter):
            fetch_start = time.perf_counter()
            batch = self.next_batch(data_iter, iteration, signals)
            data_seconds = time.perf_counter() - fetch_start
            losses, taken, stop = train_step(
                self.step_parts, batch, progress=iteration / train.max_iter
            )
            if not taken:
                self.on_nonfinite_loss(losses, iteration)
            window.add(losses, taken, data_seconds)
            self.scheduler.step()
            bar.update(1)
            done = iteration + 1
            if done % train.log_period == 0 or done == end_iter:
                self.write_log(done, window, bar)
                window = LogWindow()
            periodic_eval = train.eval_period > 0 and done % train.eval_period == 0
            if evaluate and periodic_eval and done < train.max_iter:
                self.evaluate(done, final=False)
                self.stopped_early = self.best.exhausted(train.early_stop_patience)
            if self.stopped_early:
                return done
            if done % train.checkpoint_period == 0 and done < train.max_iter:
                self.save(done)
            if stop and done < end_iter:
                self.stop_after(done, signals)
        return done

    def next_batch(self, data_iter: Any, iteration: int, signals: StopSignals) -> Batch:
        """The next batch on the device. A batch with an unreadable image stops the run (after
        checkpointing the finished iterations) unless data.on_bad_image=skip replaced it."""
        try:
            batch = next(data_iter)
        except Exception:
            # A SIGTERM sent to the whole job also ends the loader's workers: stop as asked.
            if not signals.requested():
                raise
            self.stop_after(iteration, signals)
        if batch.bad_images:
            # Saving waits for every process at a barrier, which the others (inside the step's
            # collectives) never reach: with several processes the failure record tells them.
            if get_world_size() == 1:
                self.save_finished(iteration)
            raise_on_bad_images(
                batch,
                f"stopped before iteration {iteration + 1} (last checkpoint: "
                f"{find_last_checkpoint(self.output_dir) or 'none'}); fix or remove the file, or "
                "set data.on_bad_image=skip, and run again with --resume",
            )
        self.skipped_images.update(batch.skipped_images)
        return batch.to(self.device, non_blocking=True)

    def on_nonfinite_loss(self, losses: dict[str, torch.Tensor], iteration: int) -> None:
        """train.on_nonfinite=stop: raise, naming the loss terms; skip: count the step."""
        if self.cfg.train.on_nonfinite == "skip":
            self.skipped_steps += 1
            return
        bad = [k for k, v in losses.items() if k.startswith("loss_") and not torch.isfinite(v)]
        last = find_last_checkpoint(self.output_dir) if is_main_process() else None
        values = {k: float(v.detach()) for k, v in losses.items()}
        raise NonFiniteLossError(
            f"non-finite {', '.join(bad) or 'loss on another process'} at iteration "
            f"{iteration + 1} (values: {values}); "
            f"nothing was saved for this iteration; last checkpoint: {last or 'none'}. "
            "Lower train.base_lr, enable train.clip_grad_norm, or set "
            "train.on_nonfinite=skip to skip such steps."
        )

    def write_log(self, done: int, window: LogWindow, bar: tqdm) -> None:
        values = window.values()
        values.update(
            lr=self.optimizer.param_groups[0]["lr"],
            eta_seconds=values["time"] * (self.cfg.train.max_iter - done),
        )
        if self.device.type == "cuda":
            values["max_memory_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.skipped_steps:
            values["skipped_steps"] = self.skipped_steps
        if self.skipped_images:
            values["skipped_images"] = len(self.skipped_images)
        self.log.write(done, values)
        if "loss" in values:
            bar.set_postfix(
                loss=f"{values['loss']:.3f}",
                cls=f"{values['loss_cls']:.3f}",
                box=f"{values['loss_box']:.3f}",
                lr=f"{values['lr']:.2e}",
            )

    # -- saving, evaluating, stopping ------------------------------------------------------

    def save(
        self, iteration: int, name: str | None = None, training_state: bool = True
    ) -> Path | None:
        """A checkpoint (rank 0 writes, all wait); with `training_state` a resumable one that
        `last_checkpoint` names, else weights only (the final and best models)."""
        path = None
        if is_main_process():
            training = (self.optimizer, self.scheduler, self.scaler) if training_state else ()
            path = save_checkpoint(
                self.output_dir / (name or f"model_{iteration:07d}.pth"),
                self.model,
                self.cfg,
                self.classes,
                iteration,
                *training,
                extra={"best": asdict(self.best)} if training_state else None,
            )
            if training_state:
                mark_last_checkpoint(self.output_dir, path)
                remove_old_checkpoints(self.output_dir, self.cfg.train.keep_checkpoints)
        barrier()
        return path

    def save_finished(self, done: int) -> None:
        """Checkpoint `done` finished iterations before stopping early, unless the periodic
        checkpoint (or the one resumed from) already holds them."""
        if done > self.start_iter and done % self.cfg.train.checkpoint_period:
            self.save(done)

    def stop_after(self, done: int, signals: StopSignals) -> None:
        """Checkpoint `done` finished iterations and stop on the signal received."""
        self.save_finished(done)
        last = find_last_checkpoint(self.output_dir) if is_main_process() else "a checkpoint"
        raise TrainingInterrupted(
            f"stopped by {signals.name} after iteration {done}; last checkpoint: {last or 'none'}; "
            "run again with --resume to continue",
            signals.received or signal.SIGTERM,
        )

    def evaluate(self, iteration: int, final: bool) -> CocoMetrics:
        """COCO evaluation on the val split into eval/ (final) or eval_<iteration>/, logged;
        with train.eval_period > 0 a new best model is saved as model_best.pth."""
        cfg = self.cfg
        if self.val_set is None:
            self.val_set = build_dataset(cfg, "val", training=False)
        name = "eval" if final else f"eval_{iteration:07d}"
        metrics = evaluate_model(
            self.model,
            self.val_set,
            self.classes,
            self.device,
            cfg,
            output_dir=self.output_dir / name,
            verbose=final,
        )
        numbers = metrics.summary_numbers()
        self.log.write(iteration, {f"eval/{k}": v for k, v in numbers.items()})
        if cfg.train.eval_period > 0 and self.best.update(iteration, numbers):
            self.save(iteration, BEST_CHECKPOINT, training_state=False)
            if is_main_process():
                best = {**asdict(self.best), "evaluation": name, "metrics": numbers}
                atomic_write_json(self.output_dir / BEST_METRICS_FILE, best)
        return metrics

    def finish(self, done: int, evaluate: bool) -> TrainResult:
        """The last resumable checkpoint, model_final.pth and the final evaluation."""
        if self.stopped_early and is_main_process():
            print(
                f"early stop after iteration {done}: {self.cfg.train.early_stop_patience} "
                f"evaluations without a better {self.best.metric} than {self.best.value:.4f} "
                f"(iteration {self.best.iteration})"
            )
        self.save(done)
        final = self.save(done, FINAL_CHECKPOINT, training_state=False)
        metrics = None
        if evaluate:
            metrics = self.evaluate(done, final=True)
        self.log.close()
        return TrainResult(self.output_dir, final, done, metrics, self.skipped_steps, self.best)

    def report_skipped_images(self) -> None:
        if self.skipped_images and is_main_process():
            count = len(self.skipped_images)
            print(f"skipped {count} unreadable training image(s) (data.on_bad_image=skip):")
            for message in sorted(self.skipped_images):
                print(f"  {message}")


def read_resume_state(output_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its contents (None, None for a fresh start). Rank 0
    chooses (skipping a torn newest checkpoint); every process loads its choice."""
    # An error on rank 0 reaches every process (they would wait in the broadcast for it).
    checkpoint_path, state = run_on_main(
        lambda: load_resume_checkpoint(output_dir), default=(None, None)
    )
    checkpoint_path = broadcast_from_main(checkpoint_path)
    if checkpoint_path is not None and not is_main_process():
        if not Path(checkpoint_path).is_file():
            raise FileNotFoundError(
                f"process {get_rank()} cannot read {checkpoint_path}: resuming needs --output-dir "
                "on a filesystem shared by all nodes"
            )
        state = load_checkpoint(checkpoint_path)
    return checkpoint_path, state


def build_training_model(cfg: Config, classes: ClassInfo, fresh: bool) -> RetinaNet:
    """The model to train: on a fresh start with ImageNet backbone weights or, with
    train.init_weights, a whole detector's; a resumed model's weights come from its checkpoint."""
    init_weights = cfg.train.init_weights if fresh else None
    model = build_model(cfg, classes.num_classes, load_backbone_weights=fresh and not init_weights)
    if init_weights:
        loaded_classes = load_initial_weights(model, init_weights, classes)
        if is_main_process():
            detail = "" if loaded_classes else " (other classes: new class output layer)"
            print(f"initialised from {init_weights}{detail}")
    return model


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

"""Side-by-side timings of our RetinaNet parts against torchvision's on identical inputs.

Every measurement alternates ours and torchvision's call (ABAB...) so that load from other
processes on a shared machine hits both alike, and reports medians and their ratio. The
inference benchmark runs several ways of running our detector (eager fp32, bf16, compiled,
ONNX Runtime) round-robin against torchvision's, and reports images per second.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torchvision.models import resnet50
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.retinanet import RetinaNet as TorchvisionRetinaNet
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ..config import Config, load_config
from ..data.classes import ClassInfo
from ..data.collate import Batch
from ..deploy.onnx_export import export_onnx
from ..model.build import build_model
from ..model.foreign_weights import convert_torchvision
from ..model.head import HeadOutputs
from ..model.retinanet import RetinaNet
from .checkpoint_conversion import CONFIG_DIR
from .optim import build_optimizer, create_optimizer
from .precision import autocast, grad_scaler, resolve_amp
from .step import StepParts, compile_network, train_step


@dataclass
class Comparison:
    name: str
    ours_s: float
    torchvision_s: float
    target_ratio: float | None = None

    @property
    def ratio(self) -> float:
        return self.ours_s / self.torchvision_s

    def to_dict(self) -> dict:
        """name, times, ratio, target and whether it is met, then a subclass's own fields."""
        values = asdict(self)
        target = values.pop("target_ratio")
        met = None if target is None else self.ratio <= target
        head = {key: values.pop(key) for key in ("name", "ours_s", "torchvision_s")}
        return {**head, "ratio": self.ratio, "target_ratio": target, "meets_target": met, **values}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    steps: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each callable, called in turn (A B C A B C ...) `repeats` times after
    `warmup` calls each, so that a load that comes and goes hits all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def time_alternating(
    ours: Callable[[], object], reference: Callable[[], object], repeats: int, device: torch.device
) -> tuple[float, float]:
    """Median seconds of each callable, run alternately after one warm-up call each."""
    medians = time_round_robin({"ours": ours, "reference": reference}, repeats, device)
    return medians["ours"], medians["reference"]


def random_targets(
    batch: int,
    height: int,
    width: int,
    boxes_per_image: int,
    num_classes: int,
    generator: torch.Generator,
    device: torch.device,
) -> list[dict[str, torch.Tensor]]:
    """COCO-like boxes on `device`: log-uniform sizes from 16 to 512 px, aspect ratios 1/3 to 3,
    inside the image."""
    targets = []
    for _ in range(batch):
        size = torch.exp(
            torch.empty(boxes_per_image).uniform_(math.log(16), math.log(512), generator=generator)
        )
        aspect = torch.exp(
            torch.empty(boxes_per_image).uniform_(-math.log(3), math.log(3), generator=generator)
        )
        w = (size * aspect.sqrt()).clamp(max=width - 1)
        h = (size / aspect.sqrt()).clamp(max=height - 1)
        x1 = torch.rand(boxes_per_image, generator=generator) * (width - w)
        y1 = torch.rand(boxes_per_image, generator=generator) * (height - h)
        boxes = torch.stack([x1, y1, x1 + w, y1 + h], dim=1)
        labels = torch.randint(0, num_classes, (boxes_per_image,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return targets


def detector_like_logits(
    batch: int, num_anchors: int, num_classes: int, generator: torch.Generator
) -> torch.Tensor:
    """Logits shaped like a trained detector's on a busy image: background anchors confidently
    negative for every class (logit ~ N(-8, 1), p ~ 3e-4), and 2 % of the anchors (those near
    objects) with one class scoring high (N(-1, 1.5)) and one confusable class moderately
    (N(-3, 1)): a few thousand (anchor, class) pairs per image above the 0.05 threshold."""
    logits = -8.0 + torch.randn(batch, num_anchors, num_classes, generator=generator)
    hot = torch.rand(batch, num_anchors, generator=generator) < 0.02
    b, a = torch.nonzero(hot, as_tuple=True)
    first = torch.randint(0, num_classes, (len(b),), generator=generator)
    second = (first + torch.randint(1, num_classes, (len(b),), generator=generator)) % num_classes
    logits[b, a, first] = -1.0 + 1.5 * torch.randn(len(b), generator=generator)
    logits[b, a, second] = -3.0 + torch.randn(len(b), generator=generator)
    return logits


def _setup(
    num_classes: int, height: int, width: int, device: torch.device
) -> tuple[RetinaNet, torch.nn.Module, torch.Tensor, list[int]]:
    """Our model, torchvision's (random weights, eval mode) and our anchors for an image of
    (height, width), with the number of anchors per level."""
    cfg = load_config(None, ["model.backbone.weights=", "input.size_divisibility=32"])
    ours = build_model(cfg, num_classes).to(device).eval()
    reference = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes)
    feature_sizes = [(math.ceil(height / s), math.ceil(width / s)) for s in (8, 16, 32, 64, 128)]
    anchors = ours.anchor_generator((height, width), feature_sizes, device)
    per_level = ours.anchor_generator.num_anchors_per_level(feature_sizes)
    return ours, reference.to(device).eval(), anchors, per_level


def benchmark_loss(
    device: torch.device,
    batch: int = 4,
    height: int = 800,
    width: int = 1088,
    num_classes: int = 80,
    boxes_per_image: int = 50,
    repeats: int = 5,
    seed: int = 0,
) -> Comparison:
    """Loss forward + backward from head outputs: matching, targets, focal and box losses."""
    g = torch.Generator().manual_seed(seed)
    ours, reference, anchors, _ = _setup(num_classes, height, width, device)
    num_anchors = anchors.shape[0]
    cls_logits = (torch.randn(batch, num_anchors, num_classes, generator=g) - 4.0).to(device)
    box_deltas = (0.1 * torch.randn(batch, num_anchors, 4, generator=g)).to(device)
    targets = random_targets(batch, height, width, boxes_per_image, num_classes, g, device)

    def ours_step() -> None:
        logits = cls_logits.clone().requires_grad_()
        deltas = box_deltas.clone().requires_grad_()
        losses = ours.criterion(logits, deltas, anchors, targets)
        (losses["loss_cls"] + losses["loss_box"]).backward()

    def reference_step() -> None:
        logits = cls_logits.clone().requires_grad_()
        deltas = box_deltas.clone().requires_grad_()
        losses = reference.compute_loss(
            targets, {"cls_logits": logits, "bbox_regression": deltas}, [anchors] * batch
        )
        (losses["classification"] + losses["bbox_regression"]).backward()

    ours_s, ref_s = time_alternating(ours_step, reference_step, repeats, device)
    shape = f"batch {batch}, {height}x{width}, {num_classes} classes"
    return Comparison(f"loss fwd+bwd ({shape}, {boxes_per_image} boxes)", ours_s, ref_s, 0.35)


def benchmark_postprocess(
    device: torch.device,
    logits: str = "trained",
    batch: int = 4,
    height: int = 800,
    width: int = 1088,
    num_classes: int = 80,
    repeats: int = 5,
    seed: int = 0,
) -> Comparison:
    """Inference postprocessing from head outputs (thresholds, top-k, decode, NMS).
    logits: "trained" (`detector_like_logits`) or "untrained" (standard normal: nearly every
    pair passes the threshold and the top-k caps are reached on every level)."""
    g = torch.Generator().manual_seed(seed)
    ours, reference, anchors, per_level = _setup(num_classes, height, width, device)
    if logits == "trained":
        cls_logits = detector_like_logits(batch, anchors.shape[0], num_classes, g)
    elif logits == "untrained":
        cls_logits = torch.randn(batch, anchors.shape[0], num_classes, generator=g)
    else:
        raise ValueError(f"logits must be 'trained' or 'untrained', got {logits!r}")
    cls_logits = cls_logits.to(device)
    box_deltas = (0.2 * torch.randn(batch, anchors.shape[0], 4, generator=g)).to(device)
    sizes = torch.tensor([[height, width]] * batch, device=device)

    def ours_step() -> None:
        ours.postprocessor(HeadOutputs(cls_logits, box_deltas, anchors, per_level), sizes, sizes)

    split_outputs = {
        "cls_logits": list(cls_logits.split(per_level, dim=1)),
        "bbox_regression": list(box_deltas.split(per_level, dim=1)),
    }
    split_anchors = [list(anchors.split(per_level))] * batch

    def reference_step() -> None:
        reference.postprocess_detections(split_outputs, split_anchors, [(height, width)] * batch)

    with torch.no_grad():
        ours_s, ref_s = time_alternating(ours_step, reference_step, repeats, device)
    name = f"postprocess, {logits} logits (batch {batch}, {height}x{width}, {num_classes} classes)"
    return Comparison(name, ours_s, ref_s, 0.5)


@dataclass
class TrainStepComparison(Comparison):
    """A training-step comparison with each side's peak device memory (CUDA only)."""

    ours_peak_mib: float | None = None
    torchvision_peak_mib: float | None = None


def _peak_mib(
    step: Callable[[], object], device: torch.device, optimizers: list[torch.optim.Optimizer]
) -> float | None:
    """Memory one call of `step` needs on the device (None on CPU): its peak allocation above
    what was allocated before it (models, optimizer states), with every model's gradients
    freed first, so that two models in one process are measured alike."""
    if device.type != "cuda":
        return None
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def torchvision_finetuning_retinanet(num_classes: int, height: int, width: int) -> torch.nn.Module:
    """torchvision's retinanet_resnet50_fpn as it is built to fine-tune from ImageNet weights
    (frozen BatchNorm, stem and res2 frozen: trainable_backbone_layers=3), with random
    weights; our R50 recipes freeze the same layers. (Without backbone weights torchvision
    would switch to trainable BatchNorm and train every stage, a different workload.) Its
    resize is set to leave (height, width) images at their size, as ours does."""
    backbone = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(
        backbone, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    return TorchvisionRetinaNet(
        backbone, num_classes, min_size=min(height, width), max_size=max(height, width)
    )


def benchmark_train_step(
    device: torch.device,
    batch: int = 2,
    height: int = 800,
    width: int = 1088,
    amp: str = "",
    channels_last: bool = False,
    repeats: int = 3,
    seed: int = 0,
    target_ratio: float | None = None,
) -> TrainStepComparison:
    """A whole ResNet-50-FPN RetinaNet training step, ours vs torchvision's, on the same
    images and boxes: forward (under the same autocast), loss, backward and an SGD step.
    Ours runs as training does (fused optimizer, channels-last when asked, frozen BatchNorm in
    the activation dtype); torchvision's as its reference scripts do (foreach SGD)."""
    g = torch.Generator().manual_seed(seed)
    ours, _, _, _ = _setup(80, height, width, device)
    reference = torchvision_finetuning_retinanet(80, height, width).to(device)
    ours.train()
    reference.train()
    if channels_last:
        ours.use_channels_last()
        reference.to(memory_format=torch.channels_last)
    shape = (batch, 3, height, width)
    images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)
    sizes = torch.tensor([[height, width]] * batch, device=device)
    targets = random_targets(batch, height, width, 20, 80, g, device)
    no_crowd = [{**t, "crowd_boxes": torch.zeros(0, 4, device=device)} for t in targets]
    step_batch = Batch(images, sizes, no_crowd, list(range(batch)), [(height, width)] * batch)
    parts = StepParts(
        ours, ours, create_optimizer(ours, "sgd", 1e-4, 1e-4), amp, device, grad_scaler(amp, device)
    )
    reference_optimizer = torch.optim.SGD(
        [p for p in reference.parameters() if p.requires_grad], lr=1e-4, momentum=0.9
    )
    # torchvision's reference scripts scale fp16 losses too (a disabled scaler passes through).
    scaler = grad_scaler(amp, device) or torch.amp.GradScaler(device.type, enabled=False)
    float_images = [im.float() / 255 for im in images]

    def ours_step() -> None:
        train_step(parts, step_batch, progress=0.5)

    def reference_step() -> None:
        reference_optimizer.zero_grad(set_to_none=True)
        with autocast(amp, device):
            losses = reference(float_images, targets)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(reference_optimizer)
        scaler.update()

    ours_s, ref_s = time_alternating(ours_step, reference_step, repeats, device)
    optimizers = [parts.optimizer, reference_optimizer]
    peaks = [_peak_mib(step, device, optimizers) for step in (ours_step, reference_step)]
    layout = ", channels-last" if channels_last else ""
    name = f"train step R50-FPN (batch {batch}, {height}x{width}, {amp or 'fp32'}{layout})"
    return TrainStepComparison(name, ours_s, ref_s, target_ratio, *peaks)


# Inference: images per second of each way of running our detector, against torchvision's

TORCHVISION = "torchvision"
# torchvision pads batches to a multiple of 32, and so does the converted config.
SIZE_DIVISIBILITY = 32
CONTENDERS = (
    TORCHVISION,
    "ours_fp32_unfolded",
    "ours_fp32",
    "ours_fp32_channels_last",
    "ours_bf16",
    "ours_compiled",
    "onnxruntime",
)


@dataclass
class InferenceThroughput:
    """Images per second (batch / median seconds per call) of each contender at each batch
    size, measured round-robin; `skipped` says why a contender did not run, `details` how
    one was set up (compilation and export times)."""

    name: str
    images_per_s: dict[str, dict[int, float]]
    skipped: dict[str, str] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)

    def speedup(self, contender: str, batch: int) -> float | None:
        """contender's throughput / torchvision's at `batch` (None if either is missing)."""
        ours = self.images_per_s.get(contender, {}).get(batch)
        reference = self.images_per_s.get(TORCHVISION, {}).get(batch)
        return None if ours is None or reference is None else ours / reference

    def to_dict(self) -> dict:
        batches = sorted({b for per in self.images_per_s.values() for b in per})
        return {
            "name": self.name,
            "images_per_s": {k: {str(b): v for b, v in per.items()}
                             for k, per in self.images_per_s.items()},
            "speedup_vs_torchvision": {
                k: {str(b): self.speedup(k, b) for b in batches} for k in self.images_per_s
            },
            "skipped": self.skipped,
            "details": self.details,
        }  # fmt: skip


def same_r50_models(
    device: torch.device, height: int, width: int, num_classes: int = 91, seed: int = 0
) -> tuple[torch.nn.Module, RetinaNet]:
    """torchvision's retinanet_resnet50_fpn(weights=None, weights_backbone=None) with seeded
    random weights, and ours converted from it (configs/torchvision_retinanet_R50_FPN.yaml,
    BatchNorm eps as torchvision's untrained model): the same network and the same detections.
    torchvision's resize is set to leave (height, width) images at their size, as ours does."""
    torch.manual_seed(seed)
    reference = retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes,
        min_size=min(height, width), max_size=max(height, width),
    ).eval()  # fmt: skip
    cfg = load_config(CONFIG_DIR / "torchvision_retinanet_R50_FPN.yaml",
                      ["model.backbone.norm_eps=1e-5"])  # fmt: skip
    ours = build_model(cfg, num_classes, load_backbone_weights=False)
    ours.load_state_dict(convert_torchvision(reference.state_dict()), strict=False)
    return reference.to(device), ours.to(device).eval()


def _onnx_session(model: RetinaNet, device: torch.device, size_divisibility: int):
    """ONNX Runtime session of `model` exported with a dynamic batch, and the export's
    seconds."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
        providers.insert(0, "CUDAExecutionProvider")
    k = model.num_classes
    classes = ClassInfo([str(i) for i in range(k)], list(range(k)))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory(prefix="retinanet_bench_") as work_dir:
        start = time.perf_counter()
        path = export_onnx(model, Path(work_dir) / "model.onnx", classes,
                           size_divisibility, 800, 1333)  # fmt: skip
        export_s = time.perf_counter() - start
        return ort.InferenceSession(str(path), options, providers=providers), export_s


def benchmark_inference(
    device: torch.device,
    batch_sizes: Sequence[int] = (1, 8),
    height: int = 800,
    width: int = 1333,
    repeats: int = 3,
    contenders: Sequence[str] = CONTENDERS,
    seed: int = 0,
) -> InferenceThroughput:
    """R50-FPN detection from 0-255 RGB pixels of (height, width) to detections (normalising,
    padding, network, postprocessing; no resize, the images already have the size), images
    per second at each batch size: torchvision's eager model against ours as the Detector runs
    it (frozen norms folded into the convolutions) eager in fp32 (NCHW, and channels-last), in
    bf16 (channels-last; only where the device computes bf16 natively), with the network
    compiled (inductor, fp32) and exported to ONNX Runtime; and ours eager fp32 as loaded
    (ours_fp32_unfolded: the same network as torchvision's, layer for layer).
    Contenders alternate call by call after one warm-up call each; a contender that cannot run
    is skipped with the reason. Weights are random (the same in every contender), so the class
    scores stay near the prior 0.01 and postprocessing has almost nothing to keep."""
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown or TORCHVISION not in contenders:
        raise ValueError(f"contenders must include {TORCHVISION!r} and be among {CONTENDERS}, "
                         f"got unknown {unknown}")  # fmt: skip
    reference, unfolded = same_r50_models(device, height, width, seed=seed)
    ours = copy.deepcopy(unfolded).fold_norms()
    result = InferenceThroughput(
        f"R50-FPN inference, {height}x{width}, {device.type}", {name: {} for name in contenders}
    )
    models: dict[str, RetinaNet] = {}
    session = None
    amp = resolve_amp("auto", device)
    for name in contenders:
        try:
            if name == "ours_fp32_unfolded":
                models[name] = unfolded
            elif name == "ours_fp32":
                models[name] = ours
            elif name == "ours_fp32_channels_last":
                models[name] = copy.deepcopy(ours).use_channels_last()
            elif name == "ours_bf16":
                if amp != "bf16":
                    raise RuntimeError(f"no native bf16 on this {device.type} (it would be "
                                       "emulated, slower than fp32)")  # fmt: skip
                models[name] = copy.deepcopy(ours).use_channels_last()
            elif name == "ours_compiled":
                models[name] = compile_network(copy.deepcopy(ours))
            elif name == "onnxruntime":
                session, export_s = _onnx_session(ours, device, SIZE_DIVISIBILITY)
                result.details[name] = f"export {export_s:.0f} s"
        except Exception as err:  # noqa: BLE001 - a contender that cannot run is reported, not fatal
            result.skipped[name] = f"{type(err).__name__}: {str(err)[:300]}"
    g = torch.Generator().manual_seed(seed)
    for batch in batch_sizes:
        images = torch.randint(0, 256, (batch, 3, height, width), generator=g, dtype=torch.uint8)
        steps = _inference_steps(reference, models, session, images.to(device), device)
        steps = {n: step for n, step in steps.items() if n not in result.skipped}
        for name, step in list(steps.items()):
            start = time.perf_counter()
            try:
                step()  # the warm-up; compiles the compiled contender for this batch size
            except Exception as err:  # noqa: BLE001
                result.skipped[name] = f"{type(err).__name__}: {str(err)[:300]}"
                del steps[name]
                continue
            if name == "ours_compiled":
                first = f"first call at batch {batch} {time.perf_counter() - start:.0f} s"
                result.details[name] = "; ".join(filter(None, [result.details.get(name), first]))
        medians = time_round_robin(steps, repeats, device, warmup=0)
        for name, seconds in medians.items():
            result.images_per_s[name][batch] = batch / seconds
    for name in result.skipped:
        result.images_per_s.pop(name, None)
    return result


def _inference_steps(
    reference: torch.nn.Module,
    models: dict[str, RetinaNet],
    session,
    images: torch.Tensor,
    device: torch.device,
) -> dict[str, Callable[[], object]]:
    """One call per contender on the same (B, 3, H, W) uint8 images, each in the input form its
    API takes (prepared outside the timed call): torchvision a list of 0-1 float images, ours
    the uint8 batch with its sizes (padded in the call, as collate pads), ONNX Runtime a float32
    NumPy array of 0-255 pixels (padded in the graph)."""
    batch, _, height, width = images.shape
    sizes = torch.tensor([[height, width]] * batch, device=device)
    float_images = list(images.float().div(255))
    padding = (0, (-width) % SIZE_DIVISIBILITY, 0, (-height) % SIZE_DIVISIBILITY)

    def run_reference() -> object:
        with torch.no_grad():
            return reference(float_images)

    def run_ours(model: RetinaNet, amp: str) -> Callable[[], object]:
        def step() -> object:
            with autocast(amp, device):
                return model.predict(torch.nn.functional.pad(images, padding), sizes)

        return step

    steps: dict[str, Callable[[], object]] = {TORCHVISION: run_reference}
    for name, model in models.items():
        steps[name] = run_ours(model, "bf16" if name == "ours_bf16" else "")
    if session is not None:
        pixels = images.float().cpu().numpy()
        steps["onnxruntime"] = lambda: session.run(None, {"images": pixels})
    return steps


# A recipe's own training step: precision modes and torch.compile


def synthetic_training_step(
    cfg: Config, device: torch.device, amp: str, batch_size: int | None = None
) -> tuple[StepParts, Batch]:
    """StepParts for `cfg`'s model (7 classes, as the shapes dataset) built as the trainer
    builds it, and a random batch of the recipe's input size with 5 boxes per image, both on
    `device`."""
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=7).to(device)
    if cfg.precision.channels_last:
        model.use_channels_last()
    model.train()
    t = cfg.train
    optimizer = build_optimizer(cfg, model)
    batch_size = batch_size or t.batch_size
    size = max(cfg.input.min_size)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, size, size), generator=g, dtype=torch.uint8)
    targets = []
    for _ in range(batch_size):
        xy = torch.rand(5, 2, generator=g) * size * 0.6
        wh = size / 24 + torch.rand(5, 2, generator=g) * size * 0.3
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(0, 7, (5,), generator=g),
                        "crowd_boxes": torch.zeros(0, 4)})  # fmt: skip
    sizes = torch.tensor([[size, size]] * batch_size)
    batch = Batch(images, sizes, targets, list(range(batch_size)), [(size, size)] * batch_size)
    parts = StepParts(model, model, optimizer, amp, device, grad_scaler(amp, device),
                      t.clip_grad_norm)  # fmt: skip
    return parts, batch.to(device)


def time_recipe_step(
    config: str | Path, device: torch.device, amp: str, steps: int = 10, warmup: int = 2
) -> list[float]:
    """Seconds of each of `steps` training steps of the recipe `config` (model step only: a
    synthetic batch already on the device, no data loading), after `warmup` steps."""
    cfg = load_config(config, [f"precision.amp={amp}"])
    parts, batch = synthetic_training_step(cfg, device, resolve_amp(amp, device))
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        train_step(parts, batch, progress=i / (warmup + steps))
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


# The common CPU without AVX-512, emulated on any x86 CPU: oneDNN and ATen restricted to AVX2.
AVX2_ENVIRONMENT = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@dataclass
class ModeComparison:
    """Median seconds per training step of one recipe in several modes, measured in
    alternating rounds."""

    name: str
    seconds: dict[str, float]
    details: dict[str, str]

    def to_dict(self) -> dict:
        return asdict(self)


def benchmark_recipe_modes(config: str | Path, steps: int = 10, rounds: int = 2) -> ModeComparison:
    """The recipe's CPU training step as this CPU runs it (precision.amp=auto: bf16 where native)
    and as a CPU with AVX2 only runs it (fp32, oneDNN/ATen limited to AVX2), each mode in its
    own process (the ISA limit is read at start-up), alternating `rounds` times."""
    modes = {"native_auto": ({}, "auto"), "avx2_fp32": (AVX2_ENVIRONMENT, "")}
    times: dict[str, list[float]] = {name: [] for name in modes}
    details: dict[str, str] = {}
    for _ in range(rounds):
        for name, (env, amp) in modes.items():
            command = [sys.executable, "-m", "retinanet.engine.benchmark", str(config), amp,
                       str(steps)]  # fmt: skip
            run = subprocess.run(
                command, env={**os.environ, **env}, capture_output=True, text=True, check=False
            )
            if run.returncode != 0:
                raise RuntimeError(f"{name} step timing failed: {run.stderr[-2000:]}")
            result = json.loads(run.stdout.strip().splitlines()[-1])
            times[name] += result["times"]
            details[name] = f"{result['amp']} on {result['cpu_capability']}"
    return ModeComparison(
        f"{Path(config).name} training step (batch from the recipe, model only)",
        {name: statistics.median(t) for name, t in times.items()},
        details,
    )


def benchmark_compile(
    config: str | Path, device: torch.device, amp: str = "auto", repeats: int = 5
) -> Comparison:
    """The recipe's training step with train.compile (inductor) against eager, alternating
    (Comparison's `torchvision_s` holds the eager time here). Compilation itself, before the
    timing, is reported in the name."""
    cfg = load_config(config, [f"precision.amp={amp}"])
    amp = resolve_amp(amp, device)
    eager, batch = synthetic_training_step(cfg, device, amp)
    compiled, _ = synthetic_training_step(cfg, device, amp)
    compile_network(compiled.model)
    start = time.perf_counter()
    train_step(compiled, batch, progress=0.0)
    train_step(compiled, batch, progress=0.1)
    compile_s = time.perf_counter() - start
    ours_s, eager_s = time_alternating(
        lambda: train_step(compiled, batch, 0.5), lambda: train_step(eager, batch, 0.5),
        repeats, device,
    )  # fmt: skip
    what = f"{amp or 'fp32'}; compiling took {compile_s:.0f} s"
    return Comparison(f"{Path(config).name} step compiled vs eager ({what})", ours_s, eager_s, 1.0)


if __name__ == "__main__":
    # A per-mode process of `benchmark_recipe_modes`: arguments CONFIG AMP STEPS.
    config, amp, steps = sys.argv[1:]
    device = torch.device("cpu")
    times = time_recipe_step(config, device, amp, int(steps))
    print(json.dumps({"times": times, "amp": resolve_amp(amp, device) or "fp32",
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}))  # fmt: skip

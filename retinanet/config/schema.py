"""The config schema: typed dataclasses, one per section. Each choice is typed by the alias that
its concept's module defines (e.g. `NormKind` in retinanet/model/norm.py), so the config checks
a value against the same list the code that uses it accepts; null stands for "none"."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..data.coco import OnBadImage
from ..engine.best_model import BestMetric
from ..engine.coco_metrics import EvalBackend
from ..engine.optim import LrSchedule, OptimizerImpl, OptimizerName
from ..engine.precision import AmpMode
from ..engine.step import OnNonFinite
from ..model.backbone import ResNetDepth
from ..model.criterion import BoxLossKind, Normalizer
from ..model.fpn import P6Source
from ..model.losses import GammaShape, Modulation
from ..model.norm import NormKind

# Imported at runtime (not under TYPE_CHECKING): typing.get_type_hints resolves every alias
# above by name when a config is built.


@dataclass
class BackboneConfig:
    depth: ResNetDepth = 50
    # "imagenet" (torchvision's ImageNet weights, downloaded once), null (random init) or a path
    weights: str | None = "imagenet"
    norm: NormKind = "frozen_bn"
    norm_eps: float = 1e-5
    # leading stages frozen: 0 none, 1 stem, 2 stem + res2
    freeze_at: int = 2
    stride_in_1x1: bool = False
    # residual blocks per stage res2-res5 instead of the depth's standard counts (the block type
    # follows depth): depth 18 with [1, 1, 1, 1] is ResNet-10. Empty: standard.
    blocks: list[int] = field(default_factory=list)


@dataclass
class FPNConfig:
    channels: int = 256
    # c5 (paper) or p5 (torchvision v1)
    p6_source: P6Source = "c5"
    norm: NormKind | None = None


@dataclass
class AnchorConfig:
    sizes: list[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])
    scales: list[float] = field(default_factory=lambda: [1.0, 2 ** (1 / 3), 2 ** (2 / 3)])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    offset: float = 0.0
    # torchvision compatibility: integer sizes and rounded corners, strides = image // feature
    quantize: bool = False
    stride_from_feature_size: bool = False


@dataclass
class HeadConfig:
    num_convs: int = 4
    norm: NormKind | None = None
    prior_probability: float = 0.01


@dataclass
class MatcherConfig:
    fg_iou_threshold: float = 0.5
    bg_iou_threshold: float = 0.4
    allow_low_quality_matches: bool = True
    crowd_ioa_threshold: float = 0.5


@dataclass
class InferenceConfig:
    score_threshold: float = 0.05
    topk_candidates: int = 1000
    nms_threshold: float = 0.5
    max_detections: int = 100


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    box_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    box_scale_clamp: float = math.log(1000.0 / 16)


@dataclass
class LossConfig:
    # weight of positives; null disables alpha-balancing
    alpha: float | None = 0.25
    gamma: float = 2.0
    # power: (1 - p_t)^gamma | exponential: exp(-beta p_t) | cos: cos(cos_scale p_t) |
    # gaussian: exp(-p_t^2 / gaussian_s) | flsd: gamma 5 below p_t = 0.2, 3 above (FLSD-53)
    modulation: Modulation = "power"
    exponential_beta: float = 1.0
    # pi/2 (the default) reaches 0 at p_t = 1; 1 is the literal cos(p_t)
    cos_scale: float = math.pi / 2
    gaussian_s: float = 0.2
    # binary label smoothing of the class targets (1 - eps/2 and eps/2); cross-entropy only
    label_smoothing: float = 0.0
    # null (constant gamma) | linear | cosine: gamma goes from gamma_start to gamma
    gamma_schedule: GammaShape | None = None
    gamma_start: float = 0.0
    gamma_ramp_fraction: float = 1.0
    # null: alpha is constant; with a gamma schedule, alpha goes from alpha_start to alpha
    # along the same ramp (e.g. 0.75 -> 0.25 as gamma goes 0 -> 2: Table 1b's best pairs)
    alpha_start: float | None = None
    # smooth_l1 (beta 0 = L1) | giou
    box_loss: BoxLossKind = "smooth_l1"
    smooth_l1_beta: float = 0.0
    box_loss_weight: float = 1.0
    normalizer: Normalizer = "num_foreground"
    ema_momentum: float = 0.9
    ema_initial: float = 100.0


@dataclass
class InputConfig:
    # training shortest side; several values = multi-scale training (one drawn per image)
    min_size: list[int] = field(default_factory=lambda: [800])
    max_size: int = 1333
    test_min_size: int = 800
    test_max_size: int = 1333
    flip_prob: float = 0.5
    color_jitter: bool = False
    # batches are padded to a multiple of this (P7's stride, 128)
    size_divisibility: int = 128
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])


@dataclass
class DatasetSplitConfig:
    image_dir: str = ""
    annotation_file: str = ""


@dataclass
class SyntheticDataConfig:
    """The embedded shapes dataset, generated under `root` on first use when enabled."""

    enabled: bool = False
    root: str = "datasets/shapes"
    num_train: int = 2000
    num_val: int = 300
    image_size: int = 192
    seed: int = 0


@dataclass
class DataConfig:
    train: DatasetSplitConfig = field(
        default_factory=lambda: DatasetSplitConfig(
            "datasets/coco/train2017", "datasets/coco/annotations/instances_train2017.json"
        )
    )
    val: DatasetSplitConfig = field(
        default_factory=lambda: DatasetSplitConfig(
            "datasets/coco/val2017", "datasets/coco/annotations/instances_val2017.json"
        )
    )
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    filter_empty: bool = False
    # stop | skip: an unreadable training image stops the run (after a checkpoint) or is
    # replaced by the next readable one; evaluation always stops
    on_bad_image: OnBadImage = "stop"
    num_workers: int = 4
    aspect_ratio_grouping: bool = True


@dataclass
class TrainConfig:
    max_iter: int = 90000
    # total over all processes
    batch_size: int = 16
    # learning rate at reference_batch_size; the lr used is base_lr * batch_size / reference
    base_lr: float = 0.01
    reference_batch_size: int = 16
    optimizer: OptimizerName = "sgd"
    momentum: float = 0.9
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    lr_schedule: LrSchedule = "step"
    lr_steps: list[int] = field(default_factory=lambda: [60000, 80000])
    lr_decay: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0
    # a checkpoint of ours (a finished run, or tools/convert.py's output) to start from: the whole
    # detector is loaded instead of model.backbone.weights; with other classes than the
    # dataset's, the class output layer keeps its prior-probability init. Unused on resume.
    init_weights: str | None = None
    # torch.compile the backbone, FPN and head (not the loss): faster steps after a one-off
    # compilation of a minute or more
    compile: bool = False
    # cuDNN picks the fastest convolution algorithm per input shape (CUDA only)
    cudnn_benchmark: bool = True
    # auto: fused kernels where the device has them, else foreach
    optimizer_impl: OptimizerImpl = "auto"
    # DDP: copy BatchNorm statistics from rank 0 to all ranks before every forward (off: frozen
    # BN has nothing to sync, and Detectron2 trains with per-rank statistics too)
    ddp_broadcast_buffers: bool = False
    seed: int = 0
    log_period: int = 20
    checkpoint_period: int = 5000
    # periodic checkpoints kept (newest first); 0 keeps all
    keep_checkpoints: int = 0
    # 0: evaluate only at the end
    eval_period: int = 0
    # with eval_period > 0: the COCO number (AP, AP50, ..., AR100) by which model_best.pth is
    # kept, and how many evaluations in a row without a better one end the run (0: never)
    best_metric: BestMetric = "AP"
    early_stop_patience: int = 0
    # what a non-finite loss does
    on_nonfinite: OnNonFinite = "stop"


@dataclass
class PrecisionConfig:
    """How the network computes, in training and in every inference (evaluation, prediction,
    the analyses) alike; losses are always computed in fp32."""

    # null (fp32) | bf16 | fp16 (CUDA only) | auto: bf16 where native (recent GPUs, CPUs with
    # AVX512-BF16/AMX, where it is ~2x faster than fp32), fp16 on older GPUs, else fp32
    amp: AmpMode | None = None
    # channels-last (NHWC) convolutions: faster with oneDNN on CPU and with tensor cores
    channels_last: bool = False


@dataclass
class EvalConfig:
    backend: EvalBackend = "pycocotools"
    batch_size: int = 8


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    input: InputConfig = field(default_factory=InputConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)

"""Typed configuration: dataclasses loaded from YAML files with `_base_` inheritance and
`key=value` command-line overrides. Every key is checked: an unknown key or a value of the
wrong type is an error that names the key and the file (or override) it came from.

A recipe is a short YAML file that names its base and overrides a few keys:

    _base_: retinanet_R50_FPN_1x.yaml
    model:
      backbone:
        depth: 101
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# ---------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------


@dataclass
class BackboneConfig:
    depth: int = 50
    # "imagenet" (torchvision's ImageNet weights, downloaded once), "" (random init) or a path.
    weights: str = "imagenet"
    # frozen_bn | bn | sync_bn | gn
    norm: str = "frozen_bn"
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
    p6_source: str = "c5"
    norm: str = ""


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
    norm: str = ""
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
    # power: (1 - p_t)^gamma | exponential: exp(-beta p_t)
    modulation: str = "power"
    exponential_beta: float = 1.0
    # "" (constant gamma) | linear | cosine: gamma goes from gamma_start to gamma
    gamma_schedule: str = ""
    gamma_start: float = 0.0
    gamma_ramp_fraction: float = 1.0
    # smooth_l1 (beta 0 = L1) | giou
    box_loss: str = "smooth_l1"
    smooth_l1_beta: float = 0.0
    box_loss_weight: float = 1.0
    # num_foreground | ema
    normalizer: str = "num_foreground"
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
    on_bad_image: str = "stop"
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
    # sgd | adamw
    optimizer: str = "sgd"
    momentum: float = 0.9
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    # step | cosine
    lr_schedule: str = "step"
    lr_steps: list[int] = field(default_factory=lambda: [60000, 80000])
    lr_decay: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0
    # a checkpoint of ours (a finished run, or tools/convert.py's output) to start from: the whole
    # detector is loaded instead of model.backbone.weights; with other classes than the
    # dataset's, the class output layer keeps its prior-probability init. Unused on resume.
    init_weights: str = ""
    # "" (fp32) | bf16 | fp16 (CUDA only) | auto: bf16 where native (recent GPUs, CPUs with
    # AVX512-BF16/AMX, where it is ~2x faster than fp32), fp16 on older GPUs, else fp32
    amp: str = ""
    # channels-last (NHWC) convolutions: faster with oneDNN on CPU and with tensor cores
    channels_last: bool = False
    # torch.compile the backbone, FPN and head (not the loss): faster steps after a one-off
    # compilation of a minute or more
    compile: bool = False
    # cuDNN picks the fastest convolution algorithm per input shape (CUDA only)
    cudnn_benchmark: bool = True
    # auto (fused kernels where the device has them, else foreach) | fused | foreach | for_loop
    optimizer_impl: str = "auto"
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
    # stop | skip: what a non-finite loss does
    on_nonfinite: str = "stop"


@dataclass
class EvalConfig:
    # pycocotools | faster_coco_eval
    backend: str = "pycocotools"
    batch_size: int = 8


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    input: InputConfig = field(default_factory=InputConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML file merged over its `_base_` files (paths relative to the file)."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: _base_ inheritance forms a cycle")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"
        )
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _deep_merge(merged, _read_yaml(path.parent / base, chain + (path,)))
    return _deep_merge(merged, _tag_source(data, str(path)))


class _Sourced(dict):
    """A mapping that remembers where it and each of its keys came from (a file or an
    override), for error messages: after merging, one section can hold keys from several."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source = ""
        self.key_sources: dict[str, str] = {}

    def key_source(self, key: str) -> str:
        return self.key_sources.get(key, self.source)


def _tag_source(data: dict, source: str) -> dict:
    tagged = _Sourced(
        {k: _tag_source(v, source) if isinstance(v, dict) else v for k, v in data.items()}
    )
    tagged.source = source
    tagged.key_sources = dict.fromkeys(data, source)
    return tagged


def _deep_merge(base: dict, override: dict) -> dict:
    merged = _Sourced(base)
    merged.source = getattr(override, "source", getattr(base, "source", ""))
    merged.key_sources = {k: _key_source(base, k) for k in base}
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
        merged.key_sources[key] = _key_source(override, key)
    return merged


def _key_source(data: dict, key: str) -> str:
    return data.key_source(key) if isinstance(data, _Sourced) else ""


def _unknown_key(key: str, prefix: str, known: list[str], source: str) -> ConfigError:
    full = f"{prefix}{key}"
    close = difflib.get_close_matches(key, known, n=1)
    hint = (
        f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(known)}"
    )
    where = f" in {source}" if source else ""
    return ConfigError(f"unknown config key '{full}'{where}{hint}")


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Check (and gently convert) `value` against a field's type annotation."""
    where = f" ({source})" if source else ""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(items)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; users type it all the time.
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    else:
        raise ConfigError(f"config key '{key}' has an unsupported type {annotation}")
    type_name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"config key '{key}'{where} must be {type_name}, got {value!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        source = _key_source(data, key)
        if key not in fields:
            raise _unknown_key(str(key), prefix, sorted(fields), source)
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, annotation, f"{prefix}{key}", source)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.base_lr=0.02' -> (['train', 'base_lr'], 0.02); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override {text!r} is not of the form key=value (e.g. train.max_iter=1000)"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse the value: {err}") from err
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each `key=value` of `overrides` in the nested mapping `data` (in place), remembering
    the override as the source of the key for error messages."""
    for text in overrides:
        path, value = parse_override(text)
        source = f"command-line override {text!r}"
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = _tag_source({}, source)
                node[part] = child
                _set_key_source(node, part, source)
            node = child
        node[path[-1]] = value
        _set_key_source(node, path[-1], source)
    return data


def _set_key_source(node: dict, key: str, source: str) -> None:
    if isinstance(node, _Sourced):
        node.key_sources[key] = source


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The config of a YAML file (or the defaults when `path` is None) with overrides applied."""
    data = _read_yaml(Path(path)) if path else _Sourced()
    data = apply_overrides(data, list(overrides or []))
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def config_from_dict(
    data: dict, source: str = "checkpoint", overrides: list[str] | None = None
) -> Config:
    """Rebuild a Config from `config_to_dict` output (e.g. the copy stored in a checkpoint,
    named by `source` in error messages), with overrides applied."""
    cfg = _build(Config, apply_overrides(_tag_source(data, source), list(overrides or [])))
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as nested plain dicts (stored in checkpoints)."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    """The config as YAML text that `load_config` reads back (written to config.yaml)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


_CHOICES = {
    "model.backbone.norm": ("frozen_bn", "bn", "sync_bn", "gn"),
    "model.fpn.p6_source": ("c5", "p5"),
    "model.fpn.norm": ("", "gn", "bn", "sync_bn"),
    "model.head.norm": ("", "gn", "bn", "sync_bn"),
    "loss.modulation": ("power", "exponential"),
    "loss.gamma_schedule": ("", "linear", "cosine"),
    "loss.box_loss": ("smooth_l1", "giou"),
    "loss.normalizer": ("num_foreground", "ema"),
    "train.optimizer": ("sgd", "adamw"),
    "train.lr_schedule": ("step", "cosine"),
    "train.amp": ("", "auto", "bf16", "fp16"),
    "train.optimizer_impl": ("auto", "fused", "foreach", "for_loop"),
    "data.on_bad_image": ("stop", "skip"),
    "train.on_nonfinite": ("stop", "skip"),
    "eval.backend": ("pycocotools", "faster_coco_eval"),
}


def config_value(cfg: Config, dotted: str) -> Any:
    """The value of a dotted key, e.g. config_value(cfg, "loss.gamma")."""
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def config_differences(a: Config, b: Config) -> list[str]:
    """The dotted keys whose values differ between two configs."""

    def walk(x: dict, y: dict, prefix: str) -> list[str]:
        keys = []
        for key in sorted(set(x) | set(y)):
            u, v = x.get(key), y.get(key)
            if isinstance(u, dict) and isinstance(v, dict):
                keys += walk(u, v, f"{prefix}{key}.")
            elif u != v:
                keys.append(f"{prefix}{key}")
        return keys

    return walk(config_to_dict(a), config_to_dict(b), "")


def validate(cfg: Config) -> None:
    """Checks that go beyond types: choices, ranges and consistency between keys."""
    for key, choices in _CHOICES.items():
        value = config_value(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
    checks = [
        (
            "model.backbone.depth",
            cfg.model.backbone.depth in (18, 34, 50, 101, 152),
            "one of 18, 34, 50, 101, 152",
        ),
        (
            "model.backbone.blocks",
            not cfg.model.backbone.blocks
            or (len(cfg.model.backbone.blocks) == 4 and min(cfg.model.backbone.blocks) >= 1),
            "empty (the depth's standard counts) or 4 counts >= 1 (res2-res5)",
        ),
        ("model.fpn.channels", cfg.model.fpn.channels > 0, "positive"),
        ("model.anchors.sizes", len(cfg.model.anchors.sizes) == 5, "5 sizes, one per level P3-P7"),
        ("model.box_weights", len(cfg.model.box_weights) == 4, "4 numbers"),
        ("loss.gamma", cfg.loss.gamma >= 0, ">= 0"),
        ("loss.alpha", cfg.loss.alpha is None or 0 <= cfg.loss.alpha <= 1, "in [0, 1] or null"),
        (
            "input.min_size",
            len(cfg.input.min_size) > 0 and min(cfg.input.min_size) > 0,
            "positive sizes",
        ),
        ("input.size_divisibility", cfg.input.size_divisibility > 0, "positive"),
        ("input.pixel_mean", len(cfg.input.pixel_mean) == 3, "3 numbers (RGB)"),
        (
            "input.pixel_std",
            len(cfg.input.pixel_std) == 3 and min(cfg.input.pixel_std) > 0,
            "3 positive numbers",
        ),
        ("train.max_iter", cfg.train.max_iter > 0, "positive"),
        ("train.batch_size", cfg.train.batch_size > 0, "positive"),
        ("train.base_lr", cfg.train.base_lr > 0, "positive"),
        ("train.adam_betas", len(cfg.train.adam_betas) == 2, "2 numbers"),
        ("train.log_period", cfg.train.log_period > 0, "positive"),
        ("train.checkpoint_period", cfg.train.checkpoint_period > 0, "positive"),
        ("train.reference_batch_size", cfg.train.reference_batch_size > 0, "positive"),
        ("train.warmup_iters", cfg.train.warmup_iters >= 0, ">= 0"),
        ("train.warmup_factor", 0 < cfg.train.warmup_factor <= 1, "in (0, 1]"),
        ("train.lr_steps", list(cfg.train.lr_steps) == sorted(cfg.train.lr_steps), "ascending"),
        ("train.eval_period", cfg.train.eval_period >= 0, ">= 0 (0: only at the end)"),
        ("train.clip_grad_norm", cfg.train.clip_grad_norm >= 0, ">= 0 (0: off)"),
        ("eval.batch_size", cfg.eval.batch_size > 0, "positive"),
        (
            "model.inference.score_threshold",
            0 <= cfg.model.inference.score_threshold < 1,
            "in [0, 1)",
        ),
        ("model.inference.nms_threshold", 0 < cfg.model.inference.nms_threshold <= 1, "in (0, 1]"),
        ("model.inference.topk_candidates", cfg.model.inference.topk_candidates > 0, "positive"),
        ("model.inference.max_detections", cfg.model.inference.max_detections > 0, "positive"),
        ("model.head.prior_probability", 0 < cfg.model.head.prior_probability < 1, "in (0, 1)"),
        ("model.head.num_convs", cfg.model.head.num_convs >= 0, ">= 0"),
        ("model.backbone.freeze_at", 0 <= cfg.model.backbone.freeze_at <= 5, "in [0, 5]"),
        (
            "model.backbone.stride_in_1x1",
            not cfg.model.backbone.stride_in_1x1 or cfg.model.backbone.depth >= 50,
            "false for ResNet-18/34 (their basic blocks have no 1x1 conv)",
        ),
        (
            "model.matcher.bg_iou_threshold",
            0 <= cfg.model.matcher.bg_iou_threshold <= cfg.model.matcher.fg_iou_threshold <= 1,
            "<= model.matcher.fg_iou_threshold, both in [0, 1]",
        ),
        ("data.num_workers", cfg.data.num_workers >= 0, ">= 0"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(
                f"config key '{key}' must be {expected}, got {config_value(cfg, key)!r}"
            )

"""Checks of a built config beyond its types: ranges and relations between keys."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..choices import Interval
from ..model.head import PRIOR_PROBABILITY_RANGE
from ..model.losses import (
    ALPHA_RANGE,
    COS_SCALE_RANGE,
    GAMMA_RANGE,
    GAUSSIAN_S_RANGE,
    LABEL_SMOOTHING_RANGE,
    RAMP_FRACTION_RANGE,
)
from ..model.postprocess import SCORE_THRESHOLD_RANGE
from .schema import Config, LossConfig


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


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

    return walk(dataclasses.asdict(a), dataclasses.asdict(b), "")


def validate(cfg: Config) -> None:
    """Checks that go beyond types (the schema checks types and choices): ranges and
    consistency between keys. Raises ConfigError naming the first key at fault."""
    for key, ok, expected in _checks(cfg):
        if not ok:
            raise ConfigError(
                f"config key '{key}' must be {expected}, got {config_value(cfg, key)!r}"
            )


def _checks(cfg: Config) -> list[tuple[str, bool, str]]:
    """(dotted key, whether its value is fine, what it must be) for every ranged key."""
    backbone, inference, matcher = cfg.model.backbone, cfg.model.inference, cfg.model.matcher
    return [
        (
            "model.backbone.blocks",
            not backbone.blocks or (len(backbone.blocks) == 4 and min(backbone.blocks) >= 1),
            "empty (the depth's standard counts) or 4 counts >= 1 (res2-res5)",
        ),
        ("model.fpn.channels", cfg.model.fpn.channels > 0, "positive"),
        ("model.anchors.sizes", len(cfg.model.anchors.sizes) == 5, "5 sizes, one per level P3-P7"),
        ("model.box_weights", len(cfg.model.box_weights) == 4, "4 numbers"),
        *_loss_checks(cfg.loss),
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
        _in_range(
            "model.inference.score_threshold", inference.score_threshold, SCORE_THRESHOLD_RANGE
        ),
        ("model.inference.nms_threshold", 0 < inference.nms_threshold <= 1, "in (0, 1]"),
        ("model.inference.topk_candidates", inference.topk_candidates > 0, "positive"),
        ("model.inference.max_detections", inference.max_detections > 0, "positive"),
        _in_range(
            "model.head.prior_probability",
            cfg.model.head.prior_probability,
            PRIOR_PROBABILITY_RANGE,
        ),
        ("model.head.num_convs", cfg.model.head.num_convs >= 0, ">= 0"),
        ("model.backbone.freeze_at", 0 <= backbone.freeze_at <= 5, "in [0, 5]"),
        (
            "model.backbone.stride_in_1x1",
            not backbone.stride_in_1x1 or backbone.depth >= 50,
            "false for ResNet-18/34 (their basic blocks have no 1x1 conv)",
        ),
        (
            "model.matcher.bg_iou_threshold",
            0 <= matcher.bg_iou_threshold <= matcher.fg_iou_threshold <= 1,
            "<= model.matcher.fg_iou_threshold, both in [0, 1]",
        ),
        ("data.num_workers", cfg.data.num_workers >= 0, ">= 0"),
        ("train.early_stop_patience", cfg.train.early_stop_patience >= 0, ">= 0 (0: off)"),
    ]


def _loss_checks(loss: LossConfig) -> list[tuple[str, bool, str]]:
    """`_checks` of the loss section."""
    return [
        _in_range("loss.gamma", loss.gamma, GAMMA_RANGE),
        _in_range("loss.alpha", loss.alpha, ALPHA_RANGE, "or null"),
        _in_range("loss.alpha_start", loss.alpha_start, ALPHA_RANGE, "or null"),
        (
            "loss.gamma_schedule",
            loss.gamma_schedule is None or loss.modulation == "power",
            "null unless loss.modulation is power (a schedule moves (1 - p_t)^gamma's gamma)",
        ),
        (
            "loss.alpha_start",
            loss.alpha_start is None
            or (loss.alpha is not None and loss.gamma_schedule is not None),
            "null, or set with a gamma schedule (loss.gamma_schedule) and a loss.alpha",
        ),
        _in_range("loss.gamma_start", loss.gamma_start, GAMMA_RANGE),
        _in_range("loss.gamma_ramp_fraction", loss.gamma_ramp_fraction, RAMP_FRACTION_RANGE),
        _in_range("loss.label_smoothing", loss.label_smoothing, LABEL_SMOOTHING_RANGE),
        (
            "loss.label_smoothing",
            loss.label_smoothing == 0
            or (loss.modulation == "power" and loss.gamma == 0 and loss.gamma_schedule is None),
            "0 unless the loss is cross-entropy (loss.modulation=power, loss.gamma=0, no schedule)",
        ),
        _in_range("loss.cos_scale", loss.cos_scale, COS_SCALE_RANGE),
        _in_range("loss.gaussian_s", loss.gaussian_s, GAUSSIAN_S_RANGE),
    ]


def _in_range(
    key: str, value: float | None, interval: Interval, also: str = ""
) -> tuple[str, bool, str]:
    """The check of a key whose range its concept defines (`interval`); `also` names what else
    it may be (e.g. "or null": None passes)."""
    ok = (value is None and bool(also)) or (value is not None and value in interval)
    return key, ok, f"{interval} {also}".strip()

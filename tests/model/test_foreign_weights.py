"""Detectron2 checkpoint conversion (detectron2 itself is not installable here, so the
checkpoint is built with its exact key names: modeling/backbone/resnet.py, fpn.py and
meta_arch/retinanet.py)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retinanet.config import load_config
from retinanet.model.build import build_model
from retinanet.model.foreign_weights import convert_detectron2

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "detectron2_retinanet_R50_FPN.yaml"
NUM_CLASSES = 80
SIZES = (32.0, 32.0 * 2 ** (1 / 3), 32.0 * 2 ** (2 / 3))
RATIOS = (0.5, 1.0, 2.0)


def _detectron2_shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of Detectron2's RetinaNet R50-FPN under its key names."""
    shapes = {}

    def conv(name, out_channels, in_channels, kernel, bias=False, norm=True):
        shapes[f"{name}.weight"] = (out_channels, in_channels, kernel, kernel)
        if bias:
            shapes[f"{name}.bias"] = (out_channels,)
        if norm:  # FrozenBatchNorm2d: two parameters and two statistics, as buffers
            for field in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{name}.norm.{field}"] = (out_channels,)

    conv("backbone.bottom_up.stem.conv1", 64, 3, 7)
    in_channels = 64
    for stage, (blocks, width) in enumerate(
        zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True), start=2
    ):
        for block in range(blocks):
            prefix = f"backbone.bottom_up.res{stage}.{block}"
            if block == 0:
                conv(f"{prefix}.shortcut", 4 * width, in_channels, 1)
            conv(f"{prefix}.conv1", width, in_channels, 1)
            conv(f"{prefix}.conv2", width, width, 3)
            conv(f"{prefix}.conv3", 4 * width, width, 1)
            in_channels = 4 * width
    for level, channels in zip((3, 4, 5), (512, 1024, 2048), strict=True):
        conv(f"backbone.fpn_lateral{level}", 256, channels, 1, bias=True, norm=False)
        conv(f"backbone.fpn_output{level}", 256, 256, 3, bias=True, norm=False)
    conv("backbone.top_block.p6", 256, 2048, 3, bias=True, norm=False)
    conv("backbone.top_block.p7", 256, 256, 3, bias=True, norm=False)
    for index in (0, 2, 4, 6):  # Sequential(conv, ReLU, conv, ReLU, ...)
        conv(f"head.cls_subnet.{index}", 256, 256, 3, bias=True, norm=False)
        conv(f"head.bbox_subnet.{index}", 256, 256, 3, bias=True, norm=False)
    conv("head.cls_score", 9 * num_classes, 256, 3, bias=True, norm=False)
    conv("head.bbox_pred", 9 * 4, 256, 3, bias=True, norm=False)
    return shapes


def _detectron2_cell_anchors() -> np.ndarray:
    """Detectron2's anchors of one location, size-major: index s * R + r."""
    anchors = []
    for size in SIZES:
        for ratio in RATIOS:
            width = math.sqrt(size**2 / ratio)
            anchors.append([-width / 2, -ratio * width / 2, width / 2, ratio * width / 2])
    return np.array(anchors)


@pytest.fixture(scope="module")
def detectron2_checkpoint() -> dict:
    """A model_final.pkl-like dict: {"model": {name: numpy array}} with random values."""
    rng = np.random.default_rng(0)
    model = {
        name: rng.standard_normal(shape).astype(np.float32)
        for name, shape in _detectron2_shapes(NUM_CLASSES).items()
    }
    # Each output channel of the last convs says which Detectron2 anchor it belongs to.
    for name, width in (("cls_score", NUM_CLASSES), ("bbox_pred", 4)):
        channel = np.arange(9 * width)
        code = 1000.0 * (channel // width) + channel % width  # 1000 * anchor + class (coord)
        model[f"head.{name}.bias"] = code.astype(np.float32)
        model[f"head.{name}.weight"][:, 0, 0, 0] = code
    model["pixel_mean"] = np.array([103.53, 116.28, 123.675]).reshape(3, 1, 1)
    model["pixel_std"] = np.ones((3, 1, 1))
    return {"model": model, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}


@pytest.fixture(scope="module")
def converted(detectron2_checkpoint):
    return convert_detectron2(detectron2_checkpoint)


def test_every_key_maps_and_the_model_loads(converted, detectron2_checkpoint):
    state, _ = converted
    torch.manual_seed(0)
    model = build_model(load_config(CONFIG), NUM_CLASSES, load_backbone_weights=False)
    missing, unexpected = model.load_state_dict(state, strict=False)  # shapes are checked
    assert unexpected == [] and missing == ["criterion.foreground_ema"]
    # Tensors arrived where they belong (a sample across the network).
    source = detectron2_checkpoint["model"]
    pairs = {
        "backbone.bottom_up.res4.5.conv3.norm.running_var": model.backbone.res4[5].bn3.running_var,
        "backbone.bottom_up.res3.0.shortcut.weight": model.backbone.res3[0].downsample[0].weight,
        "backbone.bottom_up.res5.0.shortcut.norm.bias": model.backbone.res5[0].downsample[1].bias,
        "backbone.bottom_up.stem.conv1.norm.weight": model.backbone.stem[1].weight,
        "backbone.fpn_lateral4.weight": model.fpn.lateral_convs[1][0].weight,
        "backbone.fpn_output5.bias": model.fpn.output_convs[2][0].bias,
        "backbone.top_block.p6.weight": model.fpn.p6[0].weight,
        "backbone.top_block.p7.bias": model.fpn.p7[0].bias,
        "head.cls_subnet.4.weight": model.head.cls_subnet[2][0].weight,
        "head.bbox_subnet.6.bias": model.head.box_subnet[3][0].bias,
    }
    for name, ours in pairs.items():
        assert torch.equal(ours, torch.as_tensor(source[name])), name
    # Detectron2's MSRA ResNet strides in the 1x1 conv; the config says so.
    assert model.backbone.res3[0].conv1.stride == (2, 2)
    assert model.fpn.p6[0].in_channels == 2048  # P6 from C5


def test_first_conv_takes_rgb(converted, detectron2_checkpoint):
    state, pixel = converted
    source = detectron2_checkpoint["model"]
    bgr_weight = torch.as_tensor(source["backbone.bottom_up.stem.conv1.weight"])
    assert torch.equal(state["backbone.stem.0.weight"], bgr_weight.flip(1))
    rgb = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(
        F.conv2d(rgb, state["backbone.stem.0.weight"]), F.conv2d(rgb.flip(1), bgr_weight)
    )
    # Pixel statistics come back in RGB order, as the config holds them.
    cfg = load_config(CONFIG)
    assert pixel["pixel_mean"] == pytest.approx(cfg.input.pixel_mean)
    assert pixel["pixel_std"] == pytest.approx(cfg.input.pixel_std)


def test_anchor_permutation_follows_the_anchor_shapes(converted):
    state, _ = converted
    ours = build_model(load_config(CONFIG), NUM_CLASSES, load_backbone_weights=False)
    cell = ours.anchor_generator.cell_anchors[0].double().numpy()  # (9, 4), ratio-major
    theirs = _detectron2_cell_anchors()
    for a in range(9):
        # The Detectron2 anchor with the same shape as our anchor a...
        (j,) = np.nonzero(np.abs(theirs - cell[a]).max(axis=1) < 1e-3)[0]
        # ...is the one size-major index s * R + r names for our ratio-major a = r * S + s.
        r, s = divmod(a, 3)
        assert j == s * 3 + r
        for name, width in (("cls_score", NUM_CLASSES), ("box_pred", 4)):
            bias = state[f"head.{name}.bias"][a * width : (a + 1) * width]
            weight = state[f"head.{name}.weight"][a * width : (a + 1) * width, 0, 0, 0]
            expected = 1000.0 * j + torch.arange(width, dtype=torch.float32)
            assert torch.equal(bias, expected) and torch.equal(weight, expected), (name, a)


def test_unknown_keys_are_named():
    with pytest.raises(KeyError, match="roi_heads.box_predictor.cls_score.weight"):
        convert_detectron2({"roi_heads.box_predictor.cls_score.weight": np.zeros(1)})

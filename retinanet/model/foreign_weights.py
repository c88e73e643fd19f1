"""Import RetinaNet weights trained by torchvision or Detectron2 into this project's layout.

Each function maps a foreign state dict onto our parameter names and returns a state dict for
`RetinaNet.load_state_dict`; the caller pairs it with a config describing the same architecture
(configs/torchvision_retinanet_R50_FPN*.yaml, configs/detectron2_retinanet_R50_FPN.yaml).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor
from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

# torchvision's COCO category list for its 91-way detectors: index = COCO category id
# ("__background__" at 0, "N/A" at the ids COCO leaves unused).
TORCHVISION_COCO_CATEGORIES = list(RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def _old_head_conv(subnet: str):
    """conv.{2i}.weight of a pre-0.13 torchvision head -> our {subnet}.{i}.0.weight."""
    return lambda m: f"head.{subnet}.{int(m.group(1)) // 2}.0.{m.group(2)}"


_TORCHVISION_RULES = [
    # (pattern, replacement) applied in order; the first match wins.
    (r"^backbone\.body\.conv1\.", "backbone.stem.0."),
    (r"^backbone\.body\.bn1\.", "backbone.stem.1."),
    (r"^backbone\.body\.layer(\d)\.", lambda m: f"backbone.res{int(m.group(1)) + 1}."),
    # FPN blocks were bare convs before torchvision 0.13 and Conv2dNormActivation after.
    (r"^backbone\.fpn\.inner_blocks\.(\d)\.(?:0\.)?(weight|bias)$", r"fpn.lateral_convs.\1.0.\2"),
    (r"^backbone\.fpn\.layer_blocks\.(\d)\.(?:0\.)?(weight|bias)$", r"fpn.output_convs.\1.0.\2"),
    (r"^backbone\.fpn\.extra_blocks\.(p6|p7)\.", r"fpn.\1.0."),
    (r"^head\.classification_head\.cls_logits\.", "head.cls_score."),
    (r"^head\.regression_head\.bbox_reg\.", "head.box_pred."),
    # Heads saved before torchvision 0.13 stored `conv.{2i}` (conv) and `conv.{2i+1}` (ReLU);
    # newer ones store `conv.{i}.0` (conv) and `conv.{i}.1` (norm, v2 only).
    (r"^head\.classification_head\.conv\.(\d+)\.(weight|bias)$", _old_head_conv("cls_subnet")),
    (r"^head\.regression_head\.conv\.(\d+)\.(weight|bias)$", _old_head_conv("box_subnet")),
    (r"^head\.classification_head\.conv\.", "head.cls_subnet."),
    (r"^head\.regression_head\.conv\.", "head.box_subnet."),
]


def _unwrap(state: dict) -> dict:
    """The model's state dict, also from a training-script checkpoint {"model": ...}."""
    return state["model"] if isinstance(state.get("model"), dict) else state


def _rename_all(state: dict, rules, source: str) -> dict:
    """state with every key renamed by `rules` (num_batches_tracked dropped); a KeyError naming
    the keys no rule recognises, if any."""
    converted, unknown = {}, []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, replacement in rules:
            new_key, count = re.subn(pattern, replacement, key)
            if count:
                converted[new_key] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"not a {source}: unrecognised keys {unknown[:8]}")
    return converted


def convert_torchvision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision `retinanet_resnet50_fpn` or `retinanet_resnet50_fpn_v2` state dict ->
    our key names. Anchor order and output channel layout are the same (ratio-major anchors,
    channel = anchor * K + class), so tensors are copied unchanged."""
    return _rename_all(_unwrap(state), _TORCHVISION_RULES, "torchvision RetinaNet state dict")


def torchvision_variant(state: dict[str, Tensor]) -> str:
    """'v1' (P6 from P5, plain heads) or 'v2' (P6 from C5, GroupNorm heads)."""
    state = _unwrap(state)
    p6 = state.get("backbone.fpn.extra_blocks.p6.weight")
    if p6 is None:
        raise KeyError(
            "not a torchvision RetinaNet state dict: no backbone.fpn.extra_blocks.p6.weight"
        )
    return "v2" if p6.shape[1] == 2048 else "v1"


# ---------------------------------------------------------------------------------------------
# Detectron2
# ---------------------------------------------------------------------------------------------

_DETECTRON2_RULES = [
    (r"^backbone\.bottom_up\.stem\.conv1\.norm\.", "backbone.stem.1."),
    (r"^backbone\.bottom_up\.stem\.conv1\.", "backbone.stem.0."),
    (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.", r"backbone.res\1.\2.downsample.1."),
    (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.", r"backbone.res\1.\2.downsample.0."),
    (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.", r"backbone.res\1.\2.bn\3."),
    (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.", r"backbone.res\1.\2.conv\3."),
    (r"^backbone\.fpn_lateral(\d)\.", lambda m: f"fpn.lateral_convs.{int(m.group(1)) - 3}.0."),
    (r"^backbone\.fpn_output(\d)\.", lambda m: f"fpn.output_convs.{int(m.group(1)) - 3}.0."),
    (r"^backbone\.top_block\.(p6|p7)\.", r"fpn.\1.0."),
    (r"^head\.cls_subnet\.(\d+)\.", lambda m: f"head.cls_subnet.{int(m.group(1)) // 2}.0."),
    (r"^head\.bbox_subnet\.(\d+)\.", lambda m: f"head.box_subnet.{int(m.group(1)) // 2}.0."),
    (r"^head\.cls_score\.", "head.cls_score."),
    (r"^head\.bbox_pred\.", "head.box_pred."),
]


def _size_major_to_ratio_major(tensor: Tensor, num_sizes: int, num_ratios: int) -> Tensor:
    """Detectron2 orders the A anchors of a location size-major (a = s * R + r); ours are
    ratio-major (a = r * S + s). Permute the output channels (dim 0) of a head's last conv."""
    per_anchor = tensor.shape[0] // (num_sizes * num_ratios)
    t = tensor.reshape(num_sizes, num_ratios, per_anchor, *tensor.shape[1:])
    return t.transpose(0, 1).reshape(tensor.shape)


def convert_detectron2(
    state: dict, num_scales: int = 3, num_aspect_ratios: int = 3
) -> tuple[dict[str, Tensor], dict[str, list[float]]]:
    """A Detectron2 RetinaNet (ResNet-FPN) `model_final.pkl` model dict -> our key names, plus
    the pixel mean/std to put in the config (in RGB order).

    Detectron2 models take BGR input; our models take RGB, so the first conv's input channels
    are reversed. Anchors are re-ordered from Detectron2's size-major to our ratio-major order.
    Detectron2's ImageNet-initialised ResNets put the stride in the bottleneck's 1x1 conv: the
    config must set model.backbone.stride_in_1x1 = true (configs/detectron2_retinanet_R50_FPN.yaml).
    """
    state = {key: torch.as_tensor(value) for key, value in _unwrap(state).items()}
    pixel = {
        key: state.pop(key).flatten().flip(0).tolist()  # BGR -> RGB
        for key in ("pixel_mean", "pixel_std")
        if key in state
    }
    converted = _rename_all(state, _DETECTRON2_RULES, "Detectron2 RetinaNet (ResNet-FPN) model")
    for key, value in converted.items():
        if key == "backbone.stem.0.weight":
            converted[key] = value.flip(1)  # BGR -> RGB input channels
        elif key.startswith(("head.cls_score.", "head.box_pred.")):
            converted[key] = _size_major_to_ratio_major(value, num_scales, num_aspect_ratios)
    return converted, pixel

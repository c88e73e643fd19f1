"""Our model, loaded from a converted torchvision state dict, returns torchvision's detections."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2

from retinanet.config import load_config
from retinanet.model.build import build_model
from retinanet.model.foreign_weights import convert_torchvision, torchvision_variant

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _test_image(path: Path) -> np.ndarray:
    """An 800 x 1024 PNG (no resize or padding at 800/1333 with padding to 32): smooth random
    background with random rectangles and discs, so no two locations look alike."""
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.normal(0, 1, (800, 1024, 3)).astype(np.float32), (0, 0), 12)
    img = (img - img.min()) / (img.max() - img.min()) * 200
    for _ in range(25):
        color = tuple(int(v) for v in rng.integers(0, 255, 3))
        x0, y0 = int(rng.integers(0, 950)), int(rng.integers(0, 730))
        w, h = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), color, -1)
        else:
            cv2.circle(img, (x0, y0), w // 3, color, -1)
    cv2.imwrite(str(path), img.clip(0, 255).astype(np.uint8))
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _randomise(model: torch.nn.Module, image: torch.Tensor, num_candidates: int = 150) -> None:
    """Seeded random weights that make a random network behave like a detector with dozens
    of confident, well-separated detections: random BatchNorm statistics (eps 0, as torchvision
    sets for its COCO weights), He-initialised head convs, a large class-logit spread and a
    class bias chosen so that `num_candidates` (anchor, class) pairs pass the 0.05 threshold."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.3, 0.6, generator=g)
                m.eps = 0.0
        for m in model.head.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, generator=g)
        cls_logits = model.head.classification_head.cls_logits
        cls_logits.weight.mul_(0.02 * 55)
        cls_logits.bias.zero_()
        model.head.regression_head.bbox_reg.weight.mul_(0.01)
        model.eval()
        images, _ = model.transform([image])
        logits = model.head(list(model.backbone(images.tensors).values()))["cls_logits"].flatten()
        threshold_logit = float(np.log(0.05 / 0.95))
        cls_logits.bias.fill_(threshold_logit - float(logits.topk(num_candidates).values[-1]))


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_same_detections_as_torchvision(tmp_path, variant):
    torch.manual_seed(0)
    if variant == "v1":
        reference = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
        config = CONFIGS / "torchvision_retinanet_R50_FPN.yaml"
    else:
        reference = retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)
        config = CONFIGS / "torchvision_retinanet_R50_FPN_v2.yaml"
    rgb = _test_image(tmp_path / "image.png")
    image = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    _randomise(reference, image.float() / 255)

    state = reference.state_dict()
    assert torchvision_variant(state) == variant
    cfg = load_config(config, ["model.backbone.norm_eps=0.0"])
    ours = build_model(cfg, num_classes=91, load_backbone_weights=False)
    missing, unexpected = ours.load_state_dict(convert_torchvision(state), strict=False)
    assert unexpected == [] and missing == ["criterion.foreground_ema"]
    ours.eval()

    with torch.no_grad():
        expected = reference([image.float() / 255])[0]
        sizes = torch.tensor([[800, 1024]])
        got = ours.predict(image[None], sizes, sizes)[0]

    assert 30 <= len(expected["boxes"]) < 300, "the test needs dozens of detections, below the cap"
    assert len(got["boxes"]) == len(expected["boxes"])
    _assert_same_detections(got, expected, box_atol=0.01, score_atol=1e-4)


def _assert_same_detections(got, expected, box_atol, score_atol):
    """One-to-one: every expected detection has a detection of the same label with its box
    within box_atol px and its score within score_atol. (Detections whose scores agree to
    1e-6 may come out of NMS in either order, so positions are not compared.)"""
    close = (
        (got["labels"][:, None] == expected["labels"][None, :])
        & ((got["scores"][:, None] - expected["scores"][None, :]).abs() <= score_atol)
        & ((got["boxes"][:, None, :] - expected["boxes"][None, :, :]).abs().amax(-1) <= box_atol)
    )
    assert close.any(dim=0).all(), (
        f"unmatched expected detections {torch.nonzero(~close.any(0)).flatten()}"
    )
    assert close.any(dim=1).all(), f"unmatched detections {torch.nonzero(~close.any(1)).flatten()}"
    assert (close.sum(0) == 1).all() and (close.sum(1) == 1).all(), "ambiguous matches"


def test_old_torchvision_key_layout_is_upgraded():
    torch.manual_seed(0)
    reference = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    state = reference.state_dict()
    # torchvision < 0.13 saved head convs as conv.{2i} and FPN blocks without the ".0".
    old = {}
    for key, value in state.items():
        key = key.replace("inner_blocks.0.0.", "inner_blocks.0.").replace(
            "layer_blocks.2.0.", "layer_blocks.2."
        )
        for i in range(4):
            key = key.replace(
                f"head.classification_head.conv.{i}.0.", f"head.classification_head.conv.{2 * i}."
            )
        old[key] = value
    converted = convert_torchvision(old)
    new = convert_torchvision(state)
    assert converted.keys() == new.keys()


def test_unknown_keys_are_named():
    with pytest.raises(KeyError, match="roi_heads.box_predictor"):
        convert_torchvision({"roi_heads.box_predictor.cls_score.weight": torch.zeros(1)})

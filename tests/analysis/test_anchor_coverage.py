"""`retinanet analyze-anchors`: the best anchor IoU of every box (exact against a brute force over
all anchors), the coverage buckets, and on a shapes dataset the finding that COCO's anchors miss
the small objects the shapes recipe's anchors cover."""

import json
import math
from pathlib import Path

import pytest
import torch

from retinanet.analysis.anchor_coverage import (
    ResizedBoxes,
    analyze_anchor_coverage,
    best_anchor_iou,
    coverage_by_size,
)
from retinanet.cli import main as cli
from retinanet.config import load_config
from retinanet.model.anchors import AnchorGenerator
from retinanet.model.matcher import pairwise_iou

REPO = Path(__file__).resolve().parents[2]
COCO_SIZES = "model.anchors.sizes=[32,64,128,256,512]"  # configs/retinanet_R50_FPN_1x.yaml's


def _random_boxes(generator: torch.Generator, n: int, height: int, width: int) -> torch.Tensor:
    side = torch.exp(torch.empty(n, 2).uniform_(math.log(3), math.log(200), generator=generator))
    side = torch.minimum(side, torch.tensor([width, height]) - 1.0)
    x1 = torch.rand(n, generator=generator) * (width - side[:, 0])
    y1 = torch.rand(n, generator=generator) * (height - side[:, 1])
    return torch.stack([x1, y1, x1 + side[:, 0], y1 + side[:, 1]], dim=1)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"sizes": (16, 32, 64, 128, 256), "aspect_ratios": (0.25, 0.5, 1.0, 2.0, 4.0)},
        # torchvision's quantised anchors, strides from padded size // feature size (not a
        # multiple of 128 here, so P6/P7's strides differ from 64/128)
        {"quantize": True, "stride_from_feature_size": True},
        {"offset": 0.5},
    ],
)
def test_best_anchor_iou_equals_brute_force_over_all_anchors(options):
    generator = AnchorGenerator(strides=(8, 16, 32, 64, 128), **options)
    rng = torch.Generator().manual_seed(0)
    sizes = [(320, 480), (224, 160)]  # two padded sizes: two anchor grids
    boxes = torch.cat([_random_boxes(rng, 300, h, w) for h, w in sizes])
    padded = torch.tensor([size for size in sizes for _ in range(300)])
    got = best_anchor_iou(generator, ResizedBoxes(boxes, padded, 2, 1), chunk_size=128)

    expected = []
    for g, (h, w) in enumerate(sizes):
        features = [(-(-h // s), -(-w // s)) for s in generator.strides]
        anchors = generator((h, w), features)
        iou = pairwise_iou(boxes[None, g * 300 : (g + 1) * 300], anchors)[0]
        expected.append(iou.amax(dim=1))
    torch.testing.assert_close(got, torch.cat(expected), rtol=0, atol=1e-6)
    assert got.min() > 0


def test_coverage_buckets_split_by_the_matcher_thresholds():
    # sides 10, 10, 20, 40, 300 px; best IoUs chosen by hand around fg 0.5 and bg 0.4
    sides = torch.tensor([10.0, 10.0, 20.0, 40.0, 300.0])
    boxes = torch.stack([torch.zeros(5), torch.zeros(5), sides, sides], dim=1)
    best = torch.tensor([0.6, 0.2, 0.4, 0.5, 0.49])
    buckets = {b.name: b for b in coverage_by_size(best, boxes, 0.5, 0.4)}
    assert buckets["all"].num_boxes == 5
    assert (buckets["all"].foreground, buckets["all"].low_quality, buckets["all"].none) == (
        0.4,
        0.4,
        0.2,
    )
    assert (buckets["8-16"].foreground, buckets["8-16"].none) == (0.5, 0.5)
    assert buckets["16-32"].low_quality == 1.0  # IoU 0.4 is in the band
    assert buckets["32-64"].foreground == 1.0  # and 0.5 is foreground
    assert buckets["small"].num_boxes == 3 and buckets["medium"].num_boxes == 1
    assert buckets["large"].low_quality == 1.0 and buckets["256+"].num_boxes == 1
    assert buckets["8-16"].median_best_iou == pytest.approx(0.4)
    assert math.isnan(buckets["0-8"].foreground) and buckets["0-8"].num_boxes == 0
    # other thresholds move the boxes between groups
    strict = {b.name: b for b in coverage_by_size(best, boxes, 0.7, 0.5)}
    assert (strict["all"].foreground, strict["all"].low_quality) == (0.0, 0.4)


@pytest.fixture(scope="module")
def shapes_overrides(tmp_path_factory) -> list[str]:
    """configs/shapes.yaml (128 px images, objects of 8-64 px, resize to 128) on 60 images."""
    root = tmp_path_factory.mktemp("anchor_shapes")
    return [
        f"data.synthetic.root={root}",
        "data.synthetic.num_train=60",
        "data.synthetic.num_val=2",
        "data.num_workers=0",
    ]


def test_shapes_coco_anchors_miss_small_objects_shapes_anchors_cover_them(shapes_overrides):
    shapes = load_config(REPO / "configs" / "shapes.yaml", shapes_overrides)
    coco = load_config(REPO / "configs" / "shapes.yaml", [*shapes_overrides, COCO_SIZES])
    with_shapes_anchors = analyze_anchor_coverage(shapes, suggest=False)
    with_coco_anchors = analyze_anchor_coverage(coco)

    assert with_shapes_anchors.current.sizes == (16, 32, 64, 128, 256)
    assert with_coco_anchors.current.sizes == (32, 64, 128, 256, 512)
    small_coco = with_coco_anchors.current.bucket("8-16")
    small_shapes = with_shapes_anchors.current.bucket("8-16")
    assert small_coco.num_boxes == small_shapes.num_boxes > 50
    # COCO's smallest anchor (32 px on P3) overlaps no 8-16 px box by even the background
    # threshold (0.4): all of them are missed. The shapes recipe's 16 px anchors miss a
    # minority, and reach foreground (0.5) for a good share.
    assert small_coco.none > 0.95 and small_coco.foreground == 0.0
    assert small_shapes.none < 0.5
    assert small_shapes.foreground > 0.25
    # 16-32 px: half of the boxes for COCO's anchors, nearly all for the recipe's
    assert with_coco_anchors.current.bucket("16-32").foreground < 0.7
    assert with_shapes_anchors.current.bucket("16-32").foreground > 0.9
    # The search proposes smaller anchors that recover the difference.
    why, suggested = with_coco_anchors.suggestions[0]
    assert why == "sizes" and suggested.sizes[0] < 32
    assert suggested.foreground > with_coco_anchors.current.foreground + 0.2
    assert suggested.bucket("8-16").foreground > small_shapes.foreground


def test_cli_writes_table_json_and_plot(shapes_overrides, tmp_path, capsys):
    out = tmp_path / "coverage"
    args = ["--config", str(REPO / "configs" / "shapes.yaml"), "--output-dir", str(out)]
    assert cli(["analyze-anchors", *args, "--max-images", "30", *shapes_overrides]) == 0
    printed = capsys.readouterr().out
    assert "| 8-16 |" in printed and "in 30 images" in printed
    data = json.loads((out / "anchor_coverage.json").read_text())
    assert data["num_images"] == 30
    assert (data["fg_iou_threshold"], data["bg_iou_threshold"]) == (0.5, 0.4)
    buckets = {b["name"]: b for b in data["current"]["buckets"]}
    total = sum(buckets[n]["num_boxes"] for n in ("small", "medium", "large"))
    assert total == buckets["all"]["num_boxes"] == data["num_boxes"]
    assert (out / "anchor_coverage.md").read_text() in printed
    assert (out / "anchor_coverage.png").stat().st_size > 10_000

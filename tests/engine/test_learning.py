"""End to end: generate a small shapes dataset, train from scratch, evaluate with pycocotools.
The same evaluation of an untrained model scores AP ~0 (test_untrained_model_scores_near_zero)."""

import json

import pytest

from retinanet.config import load_config
from retinanet.data import ensure_shapes_dataset
from retinanet.data.build import build_dataset
from retinanet.data.shapes import ObjectSampling
from retinanet.engine.checkpoint import load_trained_model
from retinanet.engine.inference import evaluate_model
from retinanet.engine.trainer import train

from .conftest import REPO

# 64 px images with 1-4 objects of 12-32 px: the smallest setting in which a from-scratch
# ResNet-18 RetinaNet learns all seven classes within two minutes of a 2-core CPU.
SIZE = 64
TRAINING = [
    # the ResNet-18 these thresholds were measured with (shapes.yaml uses ResNet-10)
    "model.backbone.blocks=[]",
    "data.num_workers=0",
    "model.fpn.channels=32",
    "model.anchors.sizes=[8,16,32,64,128]",
    f"input.min_size={SIZE}",
    f"input.max_size={SIZE}",
    f"input.test_min_size={SIZE}",
    f"input.test_max_size={SIZE}",
    "input.size_divisibility=32",
    "train.batch_size=8",
    "train.base_lr=0.002",
    "train.warmup_iters=50",
    "train.log_period=100",
    "train.checkpoint_period=100000",
    "precision.amp=",
    "precision.channels_last=false",
]


@pytest.fixture(scope="module")
def dataset_overrides(tmp_path_factory) -> list[str]:
    paths = ensure_shapes_dataset(
        tmp_path_factory.mktemp("learning") / "shapes",
        num_train=300,
        num_val=40,
        image_size=SIZE,
        objects=ObjectSampling(max_objects=4, min_object_size=12),
    )
    return [
        "data.synthetic.enabled=false",
        f"data.train.image_dir={paths.train_image_dir}",
        f"data.train.annotation_file={paths.train_annotation_file}",
        f"data.val.image_dir={paths.val_image_dir}",
        f"data.val.annotation_file={paths.val_annotation_file}",
    ]


@pytest.mark.slow
def test_model_learns_shapes(tmp_path, dataset_overrides):
    cfg = load_config(
        REPO / "configs" / "shapes.yaml", [*dataset_overrides, *TRAINING, "train.max_iter=1200"]
    )
    result = train(cfg, tmp_path / "run", progress=False)
    # Measured on a 2-core CPU: AP 0.042, AP50 0.10 after 1200 iterations (~110 s); an untrained
    # model scores AP < 0.001 on the same images.
    assert result.metrics.AP > 0.02, result.metrics.summary
    assert result.metrics.AP50 > 0.05, result.metrics.summary
    log = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [row["loss"] for row in log if "loss" in row]
    assert losses[-1] < 0.5 * losses[0], losses
    # The evaluation path used by tools/eval.py, on the saved checkpoint, gives the same numbers.
    model, saved_cfg, classes = load_trained_model(result.final_checkpoint)
    dataset = build_dataset(saved_cfg, "val", training=False)
    again = evaluate_model(model, dataset, classes, "cpu", saved_cfg, verbose=False)
    assert again.AP == pytest.approx(result.metrics.AP, abs=1e-9)


def test_untrained_model_scores_near_zero(tmp_path, dataset_overrides):
    cfg = load_config(
        REPO / "configs" / "shapes.yaml",
        [*dataset_overrides, *TRAINING, "train.max_iter=1", "train.base_lr=1e-9"],
    )
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.metrics.AP < 0.005

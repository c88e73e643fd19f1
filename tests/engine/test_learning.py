"""End to end: generate a small shapes dataset, train from scratch, evaluate with pycocotools.
A model that does not learn scores AP ~0 here (see test_untrained_model_scores_near_zero)."""

import pytest

from retinanet.config import load_config
from retinanet.data.build import build_dataset
from retinanet.engine.checkpoint import load_trained_model
from retinanet.engine.inference import evaluate_model
from retinanet.engine.trainer import train

from .conftest import REPO

LEARNING_OVERRIDES = [
    "data.synthetic.num_train=300",
    "data.synthetic.num_val=40",
    "data.synthetic.image_size=96",
    "data.num_workers=0",
    "model.fpn.channels=32",
    "model.anchors.sizes=[8,16,32,64,128]",
    "input.min_size=96",
    "input.max_size=96",
    "input.test_min_size=96",
    "input.test_max_size=96",
    "input.size_divisibility=32",
    "train.batch_size=8",
    "train.warmup_iters=20",
    "train.log_period=50",
    "train.checkpoint_period=1000",
    "train.amp=",
    "train.channels_last=false",
]


@pytest.mark.slow
def test_model_learns_shapes(tmp_path):
    cfg = load_config(
        REPO / "configs" / "shapes.yaml",
        [f"data.synthetic.root={tmp_path / 'shapes'}", "train.max_iter=250", *LEARNING_OVERRIDES],
    )
    result = train(cfg, tmp_path / "run", progress=False)
    # Measured on a 2-core CPU: AP ~0.2 after 250 iterations; an untrained model scores ~0.
    assert result.metrics.AP > 0.08, result.metrics.summary
    assert result.metrics.AP50 > 0.2, result.metrics.summary
    # The evaluation tool on the saved checkpoint reproduces the trainer's numbers.
    model, cfg2, classes = load_trained_model(result.final_checkpoint)
    again = evaluate_model(
        model, build_dataset(cfg2, "val", training=False), classes, "cpu", verbose=False
    )
    assert again.AP == pytest.approx(result.metrics.AP, abs=1e-9)


def test_untrained_model_scores_near_zero(tmp_path):
    cfg = load_config(
        REPO / "configs" / "shapes.yaml",
        [
            f"data.synthetic.root={tmp_path / 'shapes'}",
            "train.max_iter=1",
            "train.base_lr=1e-9",
            *LEARNING_OVERRIDES,
        ],
    )
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.metrics.AP < 0.02

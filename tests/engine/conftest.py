from pathlib import Path

import pytest

from retinanet.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(root: Path) -> list[str]:
    """A ResNet-18 RetinaNet with 32 channels on a 24-image, 64-pixel shapes dataset: seconds
    per iteration on a 2-core CPU."""
    return [
        f"data.synthetic.root={root}",
        "data.synthetic.num_train=24",
        "data.synthetic.num_val=8",
        "data.synthetic.image_size=64",
        "data.num_workers=0",
        "model.fpn.channels=32",
        # Pinned here rather than inherited, so that tuning the shapes recipe leaves the tests'
        # model unchanged.
        "model.fpn.norm=",
        "model.head.norm=",
        "model.backbone.blocks=[]",
        "model.anchors.sizes=[8,16,32,64,128]",
        "input.min_size=64",
        "input.max_size=64",
        "input.test_min_size=64",
        "input.test_max_size=64",
        "input.size_divisibility=32",
        "train.batch_size=4",
        "train.max_iter=6",
        "train.warmup_iters=2",
        "train.log_period=1",
        "train.checkpoint_period=3",
        "precision.amp=",
        "precision.channels_last=false",
    ]


@pytest.fixture
def tiny_config(tmp_path_factory) -> Config:
    root = tmp_path_factory.getbasetemp() / "tiny_shapes"
    return load_config(REPO / "configs" / "shapes.yaml", tiny_overrides(root))

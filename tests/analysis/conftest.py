"""Fixtures of the analysis-driver tests: the engine tests' tiny shapes setting and an untrained
checkpoint of it (the drivers' arithmetic does not need a good model, only a real one)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from retinanet.config import load_config
from retinanet.data.build import build_dataset, resolve_data_paths
from retinanet.data.classes import ClassInfo
from retinanet.engine.checkpoint import save_checkpoint
from retinanet.model.build import build_model

REPO = Path(__file__).resolve().parents[2]
SHAPES_CONFIG = REPO / "configs" / "shapes.yaml"


def _engine_tiny_overrides():
    # Test folders are not packages, so the engine tests' conftest is loaded by its path.
    spec = importlib.util.spec_from_file_location(
        "engine_test_fixtures", REPO / "tests" / "engine" / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_overrides


tiny_overrides = _engine_tiny_overrides()


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "tiny_shapes"


@pytest.fixture(scope="session")
def tiny_config_overrides(tiny_data_root) -> list[str]:
    """Overrides of configs/shapes.yaml for the tiny setting."""
    return tiny_overrides(tiny_data_root)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_data_root) -> Path:
    """An untrained tiny RetinaNet (ResNet-18, 32 channels, 7 shape classes) saved as a
    checkpoint whose stored config points at the 8-image, 64-pixel validation set. Its class
    subnet gets larger random weights than the initialisation's, which spread the logits
    (std ~2.5, scores up to ~0.99) as a trained model's are spread."""
    cfg = resolve_data_paths(load_config(SHAPES_CONFIG, tiny_overrides(tiny_data_root)))
    dataset = build_dataset(cfg, "train", training=False)
    torch.manual_seed(0)
    model = build_model(cfg, dataset.num_classes, load_backbone_weights=False)
    for module in model.head.cls_subnet.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    torch.nn.init.normal_(model.head.cls_score.weight, std=0.1)
    classes = ClassInfo(dataset.class_names, dataset.category_ids)
    path = tmp_path_factory.mktemp("tiny_checkpoint") / "model_final.pth"
    return save_checkpoint(path, model, cfg, classes, iteration=0)

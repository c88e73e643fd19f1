"""Shared test fixtures: the real COCO data kept outside the repository, beside its root."""

from pathlib import Path

import pytest

SHARED_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _shared_subdir(name: str) -> Path:
    path = SHARED_DATA_DIR / name
    if not path.is_dir():
        pytest.skip(f"shared test data not found: {path}")
    return path


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """`../shared/data` beside the repository root; the test is skipped when it is absent."""
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"shared test data not found: {SHARED_DATA_DIR}")
    return SHARED_DATA_DIR


@pytest.fixture(scope="session")
def coco_tiny_dir() -> Path:
    """50 COCO val2017 photos (`val2017/`) with their annotations
    (`annotations/instances_val2017.json`, crowd boxes included, 2 images without boxes)."""
    return _shared_subdir("coco_val2017_tiny")


@pytest.fixture(scope="session")
def cocoapi_fake_dir() -> Path:
    """cocoapi's fake-results example: `instances_val2014_100.json`,
    `results/instances_val2014_fakebbox100_results.json` and
    `expected_stats_pycocotools_2.0.11.json`."""
    return _shared_subdir("cocoapi_fake_results")

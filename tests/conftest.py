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


class FakeCuda:
    """What `fake_cuda` pretends: `count` GPUs of compute capability `capability`, the
    current one `current`; `set_device_calls` records the indices torch.cuda.set_device passed
    to the driver."""

    def __init__(self) -> None:
        self.count = 2
        self.current = 0
        self.capability = (8, 0)
        self.name = "Fake GPU"
        self.set_device_calls: list[int] = []


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeCuda:
    """CUDA as the code sees it through torch.cuda, on a machine without a GPU. Only the
    driver-level functions are replaced: torch.cuda.set_device, get_device_capability and
    get_device_name stay PyTorch's own, so an argument they reject (a CUDA device without an
    index, say) fails here as it would on a GPU."""
    import types

    import torch
    from torch.cuda._utils import _get_device_index

    fake = FakeCuda()

    def properties(device=None):
        index = _get_device_index(device, optional=True)
        if not 0 <= index < fake.count:
            raise AssertionError(f"invalid device ordinal {index}")
        major, minor = fake.capability
        return types.SimpleNamespace(major=major, minor=minor, name=fake.name, total_memory=2**34)

    def set_device(index: int) -> None:
        if not 0 <= index < fake.count:
            raise AssertionError(f"invalid device ordinal {index}")
        fake.set_device_calls.append(index)
        fake.current = index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: fake.count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", set_device)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return fake

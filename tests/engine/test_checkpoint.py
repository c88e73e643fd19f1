import os
import stat

import pytest
import torch

from retinanet import files
from retinanet.config import load_config
from retinanet.engine.checkpoint import (
    CLASS_OUTPUT_KEYS,
    ClassInfo,
    find_last_checkpoint,
    load_checkpoint,
    load_initial_weights,
    load_trained_model,
    mark_last_checkpoint,
    save_checkpoint,
)
from retinanet.model.build import build_model

CLASSES = ClassInfo(["a", "b"], [3, 7])


def _small_model():
    cfg = load_config(
        None, ["model.backbone.weights=", "model.backbone.depth=18", "model.fpn.channels=16"]
    )
    return cfg, build_model(cfg, 2)


def test_round_trip_and_trained_model_loading(tmp_path):
    cfg, model = _small_model()
    path = save_checkpoint(tmp_path / "m.pth", model, cfg, CLASSES, iteration=5)
    loaded, loaded_cfg, classes = load_trained_model(path)
    assert classes == CLASSES and loaded_cfg == cfg and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_crash_while_saving_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    cfg, model = _small_model()
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, cfg, CLASSES, iteration=1)
    before = path.read_bytes()

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, cfg, CLASSES, iteration=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]  # no temporary left behind


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="foreign.pth.*tools/convert.py"):
        load_checkpoint(foreign)


def test_architecture_mismatch_names_keys(tmp_path):
    cfg, model = _small_model()
    path = save_checkpoint(tmp_path / "m.pth", model, cfg, CLASSES, iteration=1)
    with pytest.raises(ValueError, match="m.pth does not fit"):
        load_trained_model(path, overrides=["model.head.num_convs=2"])


def test_last_checkpoint_marker(tmp_path):
    assert find_last_checkpoint(tmp_path) is None
    (tmp_path / "model_0000010.pth").write_bytes(b"x")
    mark_last_checkpoint(tmp_path, tmp_path / "model_0000010.pth")
    assert find_last_checkpoint(tmp_path).name == "model_0000010.pth"
    (tmp_path / "model_0000010.pth").unlink()
    with pytest.raises(FileNotFoundError, match="model_0000010.pth"):
        find_last_checkpoint(tmp_path)


def test_atomic_json_replaces_whole_file(tmp_path):
    target = tmp_path / "x.json"
    files.atomic_write_json(target, {"a": 1})
    files.atomic_write_json(target, {"b": 2})
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"b":2}'


def test_atomic_writes_get_normal_permissions(tmp_path):
    # mkstemp's owner-only mode must not leak into outputs: new files follow the umask, a
    # replaced file keeps its mode.
    old_umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.json"
        files.atomic_write_json(fresh, {"a": 1})
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644

        kept = tmp_path / "kept.txt"
        kept.write_text("old")
        kept.chmod(0o640)
        files.atomic_write_text(kept, "new")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640
        assert kept.read_text() == "new"
    finally:
        os.umask(old_umask)


def test_initial_weights_keep_a_fresh_class_layer_for_other_classes(tmp_path):
    cfg, source = _small_model()
    with torch.no_grad():
        source.head.cls_score.bias.add_(1.0)  # a trained-looking class layer, not the prior
    path = save_checkpoint(tmp_path / "src.pth", source, cfg, CLASSES, iteration=9)
    source_state = source.state_dict()

    torch.manual_seed(1)
    same = build_model(cfg, 2)
    assert load_initial_weights(same, path, CLASSES)
    for key, value in same.state_dict().items():
        assert torch.equal(value, source_state[key]), key

    other_classes = ClassInfo(["x", "y", "z"], [1, 2, 5])
    torch.manual_seed(1)
    other = build_model(cfg, 3)
    fresh_bias = other.head.cls_score.bias.clone()
    assert not load_initial_weights(other, path, other_classes)
    for key, value in other.state_dict().items():
        if key not in CLASS_OUTPUT_KEYS:
            assert torch.equal(value, source_state[key]), key
    # The new class layer keeps the prior-probability init: p = 0.01 everywhere.
    assert torch.equal(other.head.cls_score.bias, fresh_bias)
    assert torch.allclose(torch.sigmoid(fresh_bias), torch.full_like(fresh_bias, 0.01))


def test_initial_weights_of_another_architecture_name_file_and_tensor(tmp_path):
    cfg, source = _small_model()
    path = save_checkpoint(tmp_path / "src.pth", source, cfg, CLASSES, iteration=9)
    wider_cfg = load_config(None, ["model.backbone.weights=", "model.backbone.depth=18"])
    wider = build_model(wider_cfg, 2)
    with pytest.raises(ValueError, match=r"src\.pth.*shapes differ.*fpn\."):
        load_initial_weights(wider, path, CLASSES)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_initial_weights(wider, tmp_path / "nowhere.pth", CLASSES)


class _CreatesAFile:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    import pickle

    target = tmp_path / "pwned"
    crafted = tmp_path / "model_final.pth"
    with open(crafted, "wb") as f:
        pickle.dump({"model": _CreatesAFile(target), "config": {}, "classes": {}}, f)
    with pytest.raises(ValueError, match=r"refusing to load .*model_final\.pth"):
        load_checkpoint(crafted)
    assert not target.exists()
    # Through a tool too: a clear error, nothing executed.
    import subprocess
    import sys

    import cv2
    import numpy as np

    from .conftest import REPO

    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.zeros((32, 32, 3), np.uint8))
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "predict.py"), "--weights", str(crafted),
         "--input", str(images), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0 and "refusing to load" in run.stderr
    assert not target.exists()

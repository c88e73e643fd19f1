import os
import stat

import pytest
import torch

from retinanet.config import load_config
from retinanet.engine import files
from retinanet.engine.checkpoint import (
    ClassInfo,
    find_last_checkpoint,
    load_checkpoint,
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

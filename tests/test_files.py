"""Atomic writes: the destination is replaced whole or left untouched."""

import json
import os
import stat

import pytest

from retinanet.files import atomic_open, atomic_write_json, atomic_write_text, json_safe


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out" / "result.txt"
    atomic_write_text(path, "first\n")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_open(path, "w") as f:
            f.write("half of the second")
            raise RuntimeError("interrupted")
    assert path.read_text() == "first\n"
    assert os.listdir(path.parent) == ["result.txt"]


def test_a_new_file_gets_the_permissions_of_a_plain_open(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "b.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(umask)
    mode = stat.S_IMODE
    assert mode((tmp_path / "a.txt").stat().st_mode) == mode((tmp_path / "b.txt").stat().st_mode)


def test_json_is_strict_non_finite_numbers_become_null(tmp_path):
    data = {"AP": float("nan"), "per_class": [1.0, float("inf")], "n": 3, "name": "ü"}
    assert json_safe(data) == {"AP": None, "per_class": [1.0, None], "n": 3, "name": "ü"}
    atomic_write_json(tmp_path / "m.json", data)
    text = (tmp_path / "m.json").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"AP": None, "per_class": [1.0, None], "n": 3, "name": "ü"}

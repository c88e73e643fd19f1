"""Atomic writes: the destination is replaced whole or left untouched."""

import errno
import io
import json
import os
import stat

import pytest
import torch

import retinanet.files as files_module
from retinanet.files import (
    atomic_open,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    json_safe,
)


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


class _FillingDisk(io.FileIO):
    """A file on a disk with `room` bytes left: writes beyond it fail as a full disk does."""

    room = 4096

    def write(self, data):
        if self.tell() + memoryview(data).nbytes > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


@pytest.fixture
def full_disk(monkeypatch):
    """Binary files opened by atomic_open land on a disk with 4 KiB of room."""

    def open_on_full_disk(file, mode="r", **kwargs):
        if "b" not in mode:
            return open(file, mode, **kwargs)
        return io.BufferedWriter(_FillingDisk(file, "w"))

    monkeypatch.setattr(files_module, "open", open_on_full_disk, raising=False)


def test_a_full_disk_during_torch_save_names_the_file_and_keeps_the_old_one(tmp_path, full_disk):
    # torch.save itself reports this as "[enforce fail ...] unexpected pos", naming no file.
    path = tmp_path / "model_0000798.pth"
    path.write_bytes(b"previous checkpoint")
    with pytest.raises(OSError) as raised:
        atomic_torch_save(path, {"weight": torch.zeros(100_000)})
    assert raised.value.errno == errno.ENOSPC
    assert isinstance(raised.value.__cause__, RuntimeError)  # torch's own error stays chained
    message = str(raised.value)
    assert f"could not write {path}: {os.strerror(errno.ENOSPC)}" in message
    assert f"MiB free in {tmp_path})" in message
    assert path.read_bytes() == b"previous checkpoint"
    assert os.listdir(tmp_path) == [path.name]


def test_a_small_file_that_fits_is_written_on_the_filling_disk(tmp_path, full_disk):
    with atomic_open(tmp_path / "small.bin", "wb") as f:
        f.write(b"x" * 100)
    assert (tmp_path / "small.bin").read_bytes() == b"x" * 100


def test_errors_of_the_writing_code_pass_through_unchanged(tmp_path):
    # Only errors of the filesystem are re-raised as "could not write"; a missing input read
    # while writing, or an object JSON cannot encode, keeps its own type and message.
    with pytest.raises(FileNotFoundError, match="no-such-input"):
        with atomic_open(tmp_path / "out.txt") as f:
            f.write(open(tmp_path / "no-such-input").read())
    with pytest.raises(OSError, match="input.jpg") as raised:  # EIO reading an input, say
        with atomic_open(tmp_path / "out.txt"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), "input.jpg")
    assert raised.value.errno == errno.EIO and "could not write" not in str(raised.value)
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(tmp_path / "m.json", {"a": object()})
    assert os.listdir(tmp_path) == []


def test_interrupts_and_hidden_contexts_are_not_turned_into_write_errors(tmp_path):
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    # Ctrl-C while handling a full disk is still an interrupt.
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(tmp_path / "a.txt"):
            try:
                raise full
            except OSError:
                raise KeyboardInterrupt from None
    # An error raised `from None` has said its context is not the cause.
    with pytest.raises(ValueError, match="bad input"):
        with atomic_open(tmp_path / "b.txt"):
            try:
                raise full
            except OSError:
                raise ValueError("bad input") from None
    assert os.listdir(tmp_path) == []

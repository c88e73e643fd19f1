"""A failing process in a 2-process gloo run: the other one exits within the limit (not after the
30-minute collective timeout) with a message naming the failed rank and its error.

The two processes are started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) but without torchrun's agent, which would kill the survivor itself as soon as one
process exits: here the survivor has to stop by its own means."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from retinanet.engine import distributed
from retinanet.engine.distributed import TIMEOUT_ENV, collective_timeout, explain_failure

from .conftest import REPO, tiny_overrides

LIMIT_S = 120  # the survivor must be gone this long after the failure at the latest

# Run as each of the two processes: makes rank FAIL_RANK raise at iteration FAIL_AT of training
# (FAIL_AT=0: while choosing the checkpoint to resume from), writing the time to FAIL_MARKER
# first. FAIL_AFTER=hang keeps the failed process alive and its sockets open (frozen on its way
# out, as a process stuck in a driver call would be), so no collective of the survivor fails by
# itself; FAIL_AFTER=exit lets it exit as usual.
SCRIPT = """
import os, signal, sys, time
from pathlib import Path

import retinanet.engine.distributed as distributed
import retinanet.engine.trainer as trainer
from retinanet.cli import main

fail_at = int(os.environ["FAIL_AT"])


def fail(where):
    Path(os.environ["FAIL_MARKER"]).write_text(repr(time.time()))
    raise RuntimeError(f"injected failure {where}")


if int(os.environ["RANK"]) == int(os.environ["FAIL_RANK"]):
    if fail_at:
        real_step, calls = trainer.train_step, []

        def train_step(*args, **kwargs):
            calls.append(1)
            if len(calls) == fail_at:
                fail(f"at iteration {fail_at}")
            return real_step(*args, **kwargs)

        trainer.train_step = train_step
    else:
        trainer.load_resume_checkpoint = lambda *a, **k: fail("while choosing the checkpoint")
    if os.environ["FAIL_AFTER"] == "hang":
        distributed.shutdown_distributed = lambda: os.kill(os.getpid(), signal.SIGSTOP)
sys.exit(main(["train", *sys.argv[1:]]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("fail_rank", "fail_at", "after", "error"),
    [
        (1, 2, "exit", "RuntimeError: injected failure at iteration 2"),
        (1, 2, "hang", "RuntimeError: injected failure at iteration 2"),
        (0, 0, "hang", "RuntimeError: injected failure while choosing the checkpoint"),
    ],
    ids=["rank1-exits", "rank1-hangs", "rank0-hangs-choosing-checkpoint"],
)
def test_survivor_stops_naming_the_failed_rank(tmp_path, fail_rank, fail_at, after, error):
    script = tmp_path / "failing_train.py"
    script.write_text(SCRIPT)
    marker = tmp_path / "failed_at"
    args = [
        "--config", str(REPO / "configs" / "shapes.yaml"), "--output-dir", str(tmp_path / "run"),
        "--device", "cpu", "--no-eval", *(["--resume"] if fail_at == 0 else []),
        *tiny_overrides(tmp_path / "data"),
        "model.backbone.norm=gn", "train.max_iter=4", "train.checkpoint_period=100",
    ]  # fmt: skip
    port = _free_port()
    processes, logs = [], []
    try:
        for rank in (0, 1):
            env = {
                **os.environ,
                "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "FAIL_RANK": str(fail_rank), "FAIL_AT": str(fail_at), "FAIL_AFTER": after,
                "FAIL_MARKER": str(marker), "OMP_NUM_THREADS": "1",
            }  # fmt: skip
            env.pop("RETINANET_DEBUG", None)
            log = open(tmp_path / f"rank{rank}.log", "w")
            logs.append(log)
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(script), *args],
                    cwd=tmp_path,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        survivor = processes[1 - fail_rank]
        try:
            survivor.wait(timeout=LIMIT_S + 240)  # start-up and two iterations, then the limit
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank {1 - fail_rank} still running:\n" + _log(tmp_path, 1 - fail_rank))
        ended = time.time()
        output = _log(tmp_path, 1 - fail_rank)
        assert marker.exists(), output
        assert ended - float(marker.read_text()) < LIMIT_S, output
        assert survivor.returncode == 1, output
        assert f"rank {fail_rank} failed: {error}" in output, output
        if after == "exit":
            assert processes[fail_rank].wait(timeout=60) == 1
            assert f"error: {error.split(': ', 1)[1]}" in _log(tmp_path, fail_rank)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()  # also ends a stopped process
                process.wait()
        for log in logs:
            log.close()


def test_collective_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout().total_seconds() == 1800
    monkeypatch.setenv(TIMEOUT_ENV, "90")
    assert collective_timeout().total_seconds() == 90
    for bad in ("0", "-5", "soon", "nan"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"{TIMEOUT_ENV}='{bad}'"):
            collective_timeout()


def test_broken_collective_is_explained_by_the_first_recorded_failure(monkeypatch):
    """The rules on one store, with no process group: a rank's own error is recorded (the first
    one only) and kept; a broken collective is blamed on the recorded rank; with no record it
    says so, and records itself so that processes stuck waiting for it stop too."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    rank0, rank1 = (distributed._FailureRecord(store, rank) for rank in (0, 1))
    monkeypatch.setattr(distributed._FailureRecord, "active", rank1)
    assert explain_failure(ValueError("cannot decode image x.jpg")) is None
    assert explain_failure(KeyError("later")) is None
    monkeypatch.setattr(distributed._FailureRecord, "active", rank0)
    assert explain_failure(ValueError("rank 0's own error")) is None  # not blamed on rank 1
    peer = explain_failure(dist.DistBackendError("[gloo] Connection closed by peer"))
    assert peer.rank == 1
    assert str(peer) == "rank 1 failed: ValueError: cannot decode image x.jpg; rank 0 stopped too"
    assert rank0.read() == (1, "ValueError: cannot decode image x.jpg")

    fresh = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    alone = distributed._FailureRecord(fresh, 0)
    monkeypatch.setattr(distributed._FailureRecord, "active", alone)
    monkeypatch.setattr(distributed, "FAILURE_GRACE_S", 0.4)
    peer = explain_failure(RuntimeError("[gloo] Timed out waiting 1800000ms for recv"))
    assert peer.rank == -1 and "no process recorded an error" in str(peer)
    assert alone.read() == (0, "RuntimeError: [gloo] Timed out waiting 1800000ms for recv")


def _log(tmp_path: Path, rank: int) -> str:
    return (tmp_path / f"rank{rank}.log").read_text()[-4000:]

"""Two-process DistributedDataParallel training through torchrun (gloo on CPU)."""

import json
import subprocess
import sys

import pytest
import torch

from retinanet.config import load_config
from retinanet.engine.checkpoint import load_checkpoint
from retinanet.engine.trainer import train

from .conftest import REPO, tiny_overrides

# GroupNorm: with BatchNorm each process would normalise by its own half-batch, and the runs
# could not be compared exactly.
DDP_OVERRIDES = [
    "model.backbone.norm=gn",
    "train.max_iter=3",
    "train.checkpoint_period=100",
    # SGD: updates linear in the gradients, so float-rounding differences between the runs stay
    # tiny (Adam's first steps are ~lr * sign(g) and amplify them for near-zero gradients).
    "train.optimizer=sgd",
    "train.base_lr=0.02",
]


def test_two_process_ddp_matches_single_process(tmp_path):
    overrides = tiny_overrides(tmp_path / "data") + DDP_OVERRIDES
    cfg = load_config(REPO / "configs" / "shapes.yaml", overrides)
    single = train(cfg, tmp_path / "single", progress=False, evaluate=True)

    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(REPO / "tools" / "train.py"), "--config", str(REPO / "configs" / "shapes.yaml"),
        "--output-dir", str(tmp_path / "ddp"), "--device", "cpu", *overrides,
    ]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # Each process sees half of the same global batch and the loss is normalised by the global
    # foreground count, so the averaged gradients equal the single-process ones.
    expected = load_checkpoint(single.final_checkpoint)["model"]
    got = load_checkpoint(tmp_path / "ddp" / "model_final.pth")["model"]
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)

    # Sharded evaluation gathers every image once: the metrics match the single-process ones.
    single_metrics = json.loads((tmp_path / "single" / "eval" / "metrics.json").read_text())
    ddp_metrics = json.loads((tmp_path / "ddp" / "eval" / "metrics.json").read_text())
    assert ddp_metrics["num_images"] == single_metrics["num_images"] == 8
    for name in ("AP", "AP50", "AR100"):
        assert ddp_metrics[name] == pytest.approx(single_metrics[name], abs=1e-3)

    # Logged losses are averaged over both processes.
    lines = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines if "loss" in x] == [1, 2, 3]

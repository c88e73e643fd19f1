"""tools/gpu_selftest.py on CPU: every part runs or says why it cannot (CI keeps it working
for the machines that have a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from retinanet.engine import selftest

REPO = Path(__file__).resolve().parents[2]


def test_selftest_runs_on_cpu_and_reports_each_part(tmp_path):
    command = [sys.executable, str(REPO / "tools" / "gpu_selftest.py"), "--device", "cpu",
               "--quick", "--output-dir", str(tmp_path)]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    parts = report["parts"]
    assert report["ok"] and list(parts) == list(selftest.PARTS)
    assert parts["environment"]["device"] == "cpu"
    assert parts["cuda_tests"] == {**parts["cuda_tests"], "status": "skipped",
                                   "reason": "no CUDA device"}  # fmt: skip
    syncs = parts["host_syncs"]
    assert syncs["status"] == "ok" and max(syncs["counted_syncs_per_step"]) <= syncs["budget"] == 1
    ddp = parts["ddp"]
    assert (ddp["status"], ddp["backend"], ddp["ddp"]) == ("ok", "gloo", "DistributedDataParallel")
    assert ddp["loss_decreased"]
    assert parts["train_shapes"]["status"] == "ok" and parts["train_shapes"]["iterations"] == 4
    bench = parts["benchmark"]
    assert bench["status"] == "ok" and bench["ours_s"] > 0 and bench["torchvision_s"] > 0


def test_missing_data_packages_are_named_not_a_crash(tmp_path, monkeypatch):
    real_find_spec = selftest.importlib.util.find_spec
    monkeypatch.setattr(
        selftest.importlib.util,
        "find_spec",
        lambda name, *a: (
            None if name in ("albumentations", "pycocotools") else real_find_spec(name)
        ),
    )
    options = selftest.SelfTestOptions("cpu", True, ("environment", "train_shapes"), tmp_path)
    lines = []
    report = selftest.run_selftest(options, echo=lines.append)
    assert report["ok"]  # skipped is not failed
    assert report["parts"]["environment"]["missing_packages"] == ["albumentations", "pycocotools"]
    shapes = report["parts"]["train_shapes"]
    assert shapes["status"] == "skipped"
    assert "albumentations, pycocotools not installed" in shapes["reason"]
    assert any("train_shapes: skipped" in line for line in lines)


@pytest.mark.parametrize(
    ("visible", "device_index", "expected"), [(None, 1, "1"), ("", 1, "1"), ("3,5", 1, "5")]
)
def test_ddp_part_pins_the_torchrun_worker_to_the_gpu_asked_for(
    fake_cuda, monkeypatch, tmp_path, visible, device_index, expected
):
    # The worker's LOCAL_RANK 0 must be the GPU the self-test runs on: its entry under the
    # current CUDA_VISIBLE_DEVICES, or its index when that is unset.
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    launched = {}

    def fake_run(command, env, **kwargs):
        launched.update(command=command, env=env)
        Path(command[command.index("--ddp-worker") + 1]).write_text('{"ok": true}')
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(selftest.subprocess, "run", fake_run)
    options = selftest.SelfTestOptions(output_dir=tmp_path)
    device = selftest.resolve_device(f"cuda:{device_index}")
    assert selftest.run_ddp(device, options) == {"ok": True}
    assert launched["env"]["CUDA_VISIBLE_DEVICES"] == expected
    assert launched["command"][-2:] == ["--device", "cuda"]

"""A one-shot check of the GPU path on a machine with a GPU (and of the same code on CPU).

Parts, each reported as ok / failed / skipped (with the reason) in one JSON report:
- environment: versions, device, the optional packages the data path needs;
- cuda_tests: the tests marked `cuda` (pytest -m cuda);
- host_syncs: waits for the device per non-logging training step, from the driver
  (torch.cuda.set_sync_debug_mode) on a GPU and from HostSyncCounter everywhere;
- ddp: a one-process torchrun job through DistributedDataParallel (NCCL on a GPU, gloo on CPU);
- train_shapes: the shapes recipe trained in bf16 (where native) and its COCO AP;
- benchmark: our R50-FPN training step against torchvision's, side by side, with peak memory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torchvision

from ..config import load_config
from ..files import atomic_write_json
from .benchmark import benchmark_train_step, synthetic_training_step
from .device import device_name, resolve_device
from .distributed import init_distributed, shutdown_distributed
from .host_sync import HostSyncCounter
from .precision import resolve_amp
from .step import ddp_model, train_step

REPO = Path(__file__).resolve().parents[2]
DATA_PACKAGES = ("albumentations", "pycocotools", "cv2")


@dataclass
class SelfTestOptions:
    device: str = "auto"
    quick: bool = False  # CPU-sized work: a few iterations, small images
    parts: tuple[str, ...] = ("environment", "cuda_tests", "host_syncs", "ddp", "train_shapes",
                              "benchmark")  # fmt: skip
    output_dir: Path = field(default_factory=lambda: Path("runs/gpu_selftest"))


class Skipped(Exception):
    """A part that cannot run here; the message says why."""


def missing_packages() -> list[str]:
    return [name for name in DATA_PACKAGES if importlib.util.find_spec(name) is None]


def check_environment(device: torch.device, options: SelfTestOptions) -> dict[str, Any]:
    report = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(device),
        "device_name": device_name(device),
        "missing_packages": missing_packages(),
    }
    if device.type == "cuda":
        report["cuda"] = torch.version.cuda
        report["total_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    else:
        report["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        report["threads"] = torch.get_num_threads()
    return report


def run_cuda_tests(device: torch.device, options: SelfTestOptions) -> dict[str, Any]:
    if device.type != "cuda":
        raise Skipped("no CUDA device")
    if importlib.util.find_spec("pytest") is None:
        raise Skipped("pytest not installed")
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
               str(REPO / "tests")]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    tail = (run.stdout + run.stderr).strip().splitlines()[-15:]
    if run.returncode != 0:  # 5: nothing collected, which on a GPU is a failure too
        raise RuntimeError(f"cuda tests failed (exit {run.returncode}):\n" + "\n".join(tail))
    summary = tail[-1] if tail else ""
    return {"summary": summary, "skipped_any": "skipped" in summary}


def count_host_syncs(device: torch.device, options: SelfTestOptions) -> dict[str, Any]:
    """Training steps of the shapes-recipe network on a random batch (no dataset needed):
    syncs per step after a warm-up step, and peak memory."""
    cfg = load_config(REPO / "configs" / "shapes.yaml", ["precision.amp=auto"])
    amp = resolve_amp(cfg.precision.amp, device)
    parts, batch = synthetic_training_step(cfg, device, amp, batch_size=8 if options.quick else 16)
    train_step(parts, batch, progress=0.0)
    counted, driver_warnings = [], []
    for i in range(1, 4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    train_step(parts, batch, progress=i / 4)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
            driver_warnings.append(len(syncs))
        with HostSyncCounter() as counter:
            train_step(parts, batch, progress=i / 4)
        counted.append(counter.total)
    report: dict[str, Any] = {"amp": amp or "fp32", "counted_syncs_per_step": counted,
                              "budget": 1}  # fmt: skip
    if device.type == "cuda":
        report["driver_syncs_per_step"] = driver_warnings
        report["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if max(counted + driver_warnings) > 1:
        raise RuntimeError(f"more than 1 host sync per step: {report}")
    return report


def run_ddp(device: torch.device, options: SelfTestOptions) -> dict[str, Any]:
    """A one-process torchrun job: the process group (NCCL on a GPU), DDP's gradient
    all-reduce and our wrapper, on synthetic batches."""
    report_file = options.output_dir / "ddp_worker.json"
    report_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "1", str(REPO / "tools" / "gpu_selftest.py"), "--ddp-worker", str(report_file),
               "--device", "cuda" if device.type == "cuda" else "cpu"]  # fmt: skip
    env = dict(os.environ)
    if device.type == "cuda":  # the worker's LOCAL_RANK 0 is then the GPU asked for
        # (the entry of `device` under the current CUDA_VISIBLE_DEVICES, if it is set)
        visible = env.get("CUDA_VISIBLE_DEVICES", "").split(",")
        env["CUDA_VISIBLE_DEVICES"] = visible[device.index] if visible[0] else str(device.index)
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if run.returncode != 0 or not report_file.is_file():
        tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"torchrun job failed (exit {run.returncode}):\n{tail}")
    return json.loads(report_file.read_text())


def ddp_worker(report_file: str, device_spec: str) -> None:
    """Run inside torchrun by `run_ddp`."""
    device = init_distributed(device_spec)
    try:
        cfg = load_config(REPO / "configs" / "shapes.yaml", ["precision.amp=auto"])
        amp = resolve_amp(cfg.precision.amp, device)
        parts, batch = synthetic_training_step(cfg, device, amp, batch_size=4)
        parts.forward_model = ddp_model(parts.model, device)
        losses = [float(train_step(parts, batch, progress=i / 5)[0]["loss"]) for i in range(5)]
        report = {
            "backend": dist.get_backend(),
            "world_size": dist.get_world_size(),
            "ddp": type(parts.forward_model).__name__,
            "losses": losses,
            "loss_decreased": losses[-1] < losses[0],
        }
        atomic_write_json(report_file, report)
    finally:
        shutdown_distributed()


def train_shapes(device: torch.device, options: SelfTestOptions) -> dict[str, Any]:
    missing = missing_packages()
    if missing:
        raise Skipped(
            f"{', '.join(missing)} not installed (the data path needs them): "
            "pip install albumentations pycocotools opencv-python-headless, or install "
            "their wheels carried to this machine"
        )
    from .trainer import train

    output = options.output_dir / "shapes"
    overrides = ["precision.amp=auto", f"data.num_workers={min(8, os.cpu_count() or 1)}"]
    if options.quick:
        overrides += [
            f"data.synthetic.root={options.output_dir / 'shapes_quick_data'}",
            "data.synthetic.num_train=32", "data.synthetic.num_val=8",
            "data.synthetic.image_size=64", "input.min_size=[64]", "input.max_size=64",
            "input.test_min_size=64", "input.test_max_size=64", "train.max_iter=4",
            "train.batch_size=4", "train.warmup_iters=1", "train.log_period=2",
            "model.fpn.channels=16", "model.anchors.sizes=[8,16,32,64,128]", "data.num_workers=0",
        ]  # fmt: skip
    cfg = load_config(REPO / "configs" / "shapes.yaml", overrides)
    start = time.perf_counter()
    result = train(cfg, output, device=str(device), progress=False)
    seconds = time.perf_counter() - start
    lines = (output / "metrics.jsonl").read_text().splitlines()
    times = [json.loads(x)["time"] for x in lines if '"time"' in x]
    metrics = result.metrics
    return {
        "iterations": result.iterations,
        "minutes_total": seconds / 60,
        "seconds_per_iteration": times[-1] if times else None,
        "AP": metrics.AP if metrics else None,
        "AP50": metrics.AP50 if metrics else None,
        "peak_memory_mib": (
            torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        ),
    }


def run_benchmark(device: torch.device, options: SelfTestOptions) -> dict[str, Any]:
    if options.quick or device.type != "cuda":
        size: dict[str, Any] = {"batch": 1, "height": 256, "width": 320, "repeats": 2}
    else:
        size = {"batch": 16, "height": 800, "width": 1344, "repeats": 3, "target_ratio": 1 / 2.5}
    amp = resolve_amp("auto", device)
    return benchmark_train_step(device, amp=amp, channels_last=True, **size).to_dict()


PARTS: dict[str, Callable[[torch.device, SelfTestOptions], dict[str, Any]]] = {
    "environment": check_environment,
    "cuda_tests": run_cuda_tests,
    "host_syncs": count_host_syncs,
    "ddp": run_ddp,
    "train_shapes": train_shapes,
    "benchmark": run_benchmark,
}


def run_selftest(options: SelfTestOptions, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the parts in order; a failing part is reported and the others still run. The report
    is written to options.output_dir / report.json and returned."""
    device = resolve_device(options.device)
    options.output_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": str(device), "quick": options.quick, "parts": {}}
    start = time.perf_counter()
    for name in options.parts:
        part_start = time.perf_counter()
        if device.type == "cuda":  # each part's peak memory is its own
            torch.cuda.reset_peak_memory_stats(device)
        try:
            entry = {"status": "ok", **PARTS[name](device, options)}
        except Skipped as reason:
            entry = {"status": "skipped", "reason": str(reason)}
        except Exception as err:  # noqa: BLE001 - report and go on with the other parts
            entry = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                     "traceback": traceback.format_exc(limit=8)}  # fmt: skip
        entry["seconds"] = round(time.perf_counter() - part_start, 1)
        report["parts"][name] = entry
        detail = entry.get("reason") or entry.get("error") or ""
        echo(f"{name}: {entry['status']} ({entry['seconds']} s) {detail}".rstrip())
        atomic_write_json(options.output_dir / "report.json", report)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["ok"] = all(p["status"] != "failed" for p in report["parts"].values())
    atomic_write_json(options.output_dir / "report.json", report)
    return report

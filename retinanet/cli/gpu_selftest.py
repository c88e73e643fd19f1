r"""One-shot check of the GPU path, writing one JSON report (runs/gpu_selftest/report.json).

    retinanet gpu-selftest                  # on a machine with a GPU: about 5 minutes
    retinanet gpu-selftest --device cpu --quick   # the same code on CPU (CI runs this)

Parts: environment, cuda_tests (pytest -m cuda), host_syncs (per training step, from the CUDA
driver and from our operator counter), ddp (a one-process torchrun job, NCCL on a GPU),
train_shapes (the shapes recipe in bf16 and its AP), benchmark (R50-FPN training step vs
torchvision's at 800x1344, batch 16, with peak memory). Parts that cannot run here are
reported as skipped with the reason; the exit status is 1 if any part failed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retinanet.cli.arguments import add_device
from retinanet.engine.selftest import PARTS, SelfTestOptions, ddp_worker, run_selftest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_device(parser)
    parser.add_argument("--quick", action="store_true", help="CPU-sized work in every part")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--output-dir", default="runs/gpu_selftest")
    parser.add_argument("--ddp-worker", metavar="REPORT", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.ddp_worker:
        ddp_worker(args.ddp_worker, args.device)
        return 0
    options = SelfTestOptions(args.device, args.quick, tuple(args.parts), Path(args.output_dir))
    report = run_selftest(options)
    print(f"report: {Path(args.output_dir) / 'report.json'} ({report['seconds']} s)")
    return 0 if report["ok"] else 1

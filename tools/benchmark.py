"""Speed of our loss and postprocessing against torchvision's RetinaNet, side by side on
identical inputs (alternating calls; medians; ratio = ours / torchvision).

    python tools/benchmark.py                       # loss + postprocess on CPU
    python tools/benchmark.py --device cuda --train-step --output bench.json

Targets: loss <= 0.35x and postprocess <= 0.5x of torchvision's time.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.engine.benchmark import benchmark_loss, benchmark_postprocess, benchmark_train_step  # noqa: E402
from retinanet.engine.files import atomic_write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--train-step", action="store_true", help="also time a whole ResNet-50 training step"
    )
    parser.add_argument("--output", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    comparisons = [
        benchmark_loss(device, repeats=args.repeats),
        benchmark_postprocess(device, "trained", repeats=args.repeats),
        benchmark_postprocess(device, "untrained", repeats=args.repeats),
    ]
    if args.train_step:
        comparisons.append(benchmark_train_step(device, repeats=max(2, args.repeats // 2)))
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or "cpu"
    threads = torch.get_num_threads()
    print(f"device: {device} ({device_name}), torch {torch.__version__}, {threads} threads")
    for c in comparisons:
        verdict = ""
        if c.target_ratio is not None:
            met = "met" if c.ratio <= c.target_ratio else "NOT met"
            verdict = f" (target <= {c.target_ratio:.2f}x: {met})"
        print(
            f"{c.name}: ours {c.ours_s:.4f} s, torchvision {c.torchvision_s:.4f} s, "
            f"ratio {c.ratio:.3f}x{verdict}"
        )
    if args.output:
        atomic_write_json(
            args.output,
            {
                "device": str(device),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "results": [c.to_dict() for c in comparisons],
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

r"""Speed, measured side by side in one run (alternating calls; medians; ratio = ours / other).

    retinanet benchmark                        # loss + postprocessing vs torchvision, CPU
    retinanet benchmark --train-step           # + the R50-FPN training step vs torchvision
    retinanet benchmark --device cuda --train-step --amp auto --channels-last --batch 16 \
        --height 800 --width 1344 --output bench.json
    retinanet benchmark --no-parts --recipe configs/shapes.yaml   # the recipe's step on
        # this CPU (precision.amp=auto) and emulating an AVX2-only CPU in fp32
    retinanet benchmark --no-parts --compile configs/shapes.yaml  # compiled vs eager
    retinanet benchmark --no-parts --inference   # images/s, R50-FPN 800x1333, batch 1 and 8:
        # ours eager fp32 / bf16 / compiled / ONNX Runtime against torchvision's eager
    retinanet benchmark --no-parts --inference --batch-sizes 1 4 --height 512 --width 640 \
        --contenders torchvision ours_fp32 onnxruntime

Targets: loss <= 0.35x and postprocessing <= 0.5x of torchvision's time; training step
<= 0.7x on CPU and >= 2.5x faster on a GPU (800x1344, batch 16, bf16); compiled <= 1.0x eager;
inference, our eager fp32 >= 1.1x torchvision's images per second.
"""

from __future__ import annotations

import argparse

import torch

from retinanet.engine.benchmark import (
    CONTENDERS,
    TORCHVISION,
    InferenceThroughput,
    benchmark_compile,
    benchmark_inference,
    benchmark_loss,
    benchmark_postprocess,
    benchmark_recipe_modes,
    benchmark_train_step,
)
from retinanet.engine.device import device_name, resolve_device
from retinanet.engine.precision import resolve_amp
from retinanet.files import atomic_write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-parts", action="store_true", help="skip loss and postprocessing")
    parser.add_argument("--train-step", action="store_true", help="time a R50-FPN training step")
    parser.add_argument("--amp", default="", help="'' (fp32), auto, bf16, fp16: train step")
    parser.add_argument("--channels-last", action="store_true", help="train step channels-last")
    parser.add_argument("--batch", type=int, default=2, help="train step batch size")
    parser.add_argument("--height", type=int, help="800 (train step, inference)")
    parser.add_argument("--width", type=int, help="1088 (train step), 1333 (inference)")
    parser.add_argument("--inference", action="store_true", help="R50-FPN inference images/s")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 8], help="--inference batch sizes"
    )
    parser.add_argument(
        "--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS),
        help="--inference: what to run (torchvision always runs)",
    )  # fmt: skip
    parser.add_argument("--recipe", metavar="CONFIG", help="time CONFIG's step: native vs AVX2")
    parser.add_argument("--steps", type=int, default=10, help="--recipe: steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="--recipe: processes per mode")
    parser.add_argument("--compile", metavar="CONFIG", help="time CONFIG's step compiled vs eager")
    parser.add_argument("--output", help="write the results as JSON")


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    amp = resolve_amp(args.amp, device)  # a bad --amp fails before any part runs
    torch.manual_seed(0)
    cpu = torch.backends.cpu.get_cpu_capability()
    print(
        f"device: {device} ({device_name(device)}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU {cpu}"
    )
    comparisons, modes, throughputs = [], [], []
    if not args.no_parts:
        comparisons += [
            benchmark_loss(device, repeats=args.repeats),
            benchmark_postprocess(device, "trained", repeats=args.repeats),
            benchmark_postprocess(device, "untrained", repeats=args.repeats),
        ]
    if args.train_step:
        target = 0.7 if device.type == "cpu" else 1 / 2.5
        step = benchmark_train_step(device, args.batch, args.height or 800, args.width or 1088,
                                    amp, args.channels_last, max(2, args.repeats // 2),
                                    target_ratio=target)  # fmt: skip
        comparisons.append(step)
    if args.compile:
        comparisons.append(
            benchmark_compile(args.compile, device, args.amp or "auto", repeats=args.repeats)
        )
    if args.recipe:
        modes.append(benchmark_recipe_modes(args.recipe, args.steps, args.rounds))
    if args.inference:
        if min(args.batch_sizes) < 1:
            raise ValueError(f"--batch-sizes must be positive, got {args.batch_sizes}")
        contenders = [TORCHVISION] + [c for c in args.contenders if c != TORCHVISION]
        size = (args.height or 800, args.width or 1333)
        throughputs.append(
            benchmark_inference(device, args.batch_sizes, *size, args.repeats, contenders)
        )
    _print_results(comparisons, modes)
    for t in throughputs:
        print(_throughput_table(t))
    if args.output:
        results = [r.to_dict() for r in [*comparisons, *modes, *throughputs]]
        atomic_write_json(
            args.output,
            {
                "device": str(device),
                "device_name": device_name(device),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "results": results,
            },
        )
    return 0


def _print_results(comparisons: list, modes: list) -> None:
    """One line per side-by-side comparison (with its target verdict) and per recipe mode."""
    for c in comparisons:
        verdict = ""
        if c.target_ratio is not None:
            met = "met" if c.ratio <= c.target_ratio else "NOT met"
            verdict = f" (target <= {c.target_ratio:.2f}x: {met})"
        memory = ""
        if getattr(c, "ours_peak_mib", None) is not None:
            peaks = f"ours {c.ours_peak_mib:.0f} MiB, other {c.torchvision_peak_mib:.0f} MiB"
            memory = f"; peak memory {peaks}"
        print(f"{c.name}: ours {c.ours_s:.4f} s, other {c.torchvision_s:.4f} s, "
              f"ratio {c.ratio:.3f}x{verdict}{memory}")  # fmt: skip
    for m in modes:
        timings = ", ".join(f"{k} {v:.3f} s ({m.details[k]})" for k, v in m.seconds.items())
        print(f"{m.name}: {timings}")


def _throughput_table(result: InferenceThroughput) -> str:
    """A Markdown table: images/s per contender and batch size, and the ratio to torchvision."""
    batches = sorted({b for per in result.images_per_s.values() for b in per})
    header = "| contender | " + " | ".join(f"batch {b}: images/s (x torchvision)" for b in batches)
    lines = [result.name, header + " |", "|---" * (len(batches) + 1) + "|"]
    for name, per in result.images_per_s.items():
        cells = [f"{per[b]:.3f} ({result.speedup(name, b):.2f}x)" for b in batches]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, reason in result.skipped.items():
        lines.append(f"skipped {name}: {reason}")
    for name, detail in result.details.items():
        lines.append(f"{name}: {detail}")
    for b in batches:
        ratio = result.speedup("ours_fp32", b)
        if ratio is not None:
            met = "met" if ratio >= 1.1 else "NOT met"
            lines.append(f"batch {b}: ours_fp32 {ratio:.2f}x torchvision (target >= 1.1x: {met})")
    return "\n".join(lines)

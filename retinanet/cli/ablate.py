r"""Train a grid of loss settings from one base config and tabulate their COCO AP (paper Table 1).

    retinanet ablate --config configs/shapes.yaml --output-dir runs/table1b --grid table1b
    retinanet ablate --config configs/retinanet_R50_FPN_600.yaml --output-dir runs/t1a \
        --grid table1a --max-iter 20000 train.on_nonfinite=skip
    retinanet ablate --list                  # every grid and its settings
    retinanet ablate --grid table1b --list
    retinanet ablate --config configs/shapes.yaml --output-dir runs/table1b \
        --grid table1b --only gamma2.0_alpha0.25 gamma5.0_alpha0.25

Grids: table1a (gamma 0, alpha .10 to .999), table1b (gamma 0 to 5 with the paper's best alpha),
alpha (alpha .25 to .8 at gamma 2), modulation ((1 - p_t)^gamma, exp(-beta p_t), exp(-p_t^2 / s)
and cos(c p_t) at matched f(0.9), and the literal cos(p_t)), gamma_schedule (gamma 2 constant vs
ramps: linear / cosine from 0, at alpha .25, .5 and alpha following gamma from .75 to .25, a
short ramp, 4 -> 2 downwards), calibration (CE, CE + label smoothing .1, focal loss gamma 1, 2,
3 and FLSD-53). --seeds N trains each setting with N seeds (folders NAME, NAME_seed1, ...) and
tabulates mean, standard deviation and each seed's AP.

Each setting trains into DIR/<setting>/ and resumes there after an interruption; finished
settings are skipped, so rerunning the same command continues the grid. --only runs some
settings (e.g. one per machine), --list prints the names. A setting whose loss becomes
non-finite is recorded as failed and the grid goes on (--retry-failed tries again). After every
run DIR/ablation.csv and DIR/ablation.md are rebuilt from all finished and failed settings, with
the paper's numbers beside table1a/table1b. --max-iter shortens the schedule, scaling its lr
steps, warmup and checkpoint period alike. Trailing key=value arguments override config keys
(but not the keys the grid varies).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retinanet.analysis.ablation import GRIDS, get_grid, run_ablation
from retinanet.cli.arguments import add_device, add_overrides
from retinanet.engine.distributed import is_main_process


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="base YAML config (required unless --list)")
    parser.add_argument("--output-dir", help="grid folder (required unless --list)")
    parser.add_argument("--grid", help=f"one of {', '.join(GRIDS)} (default table1b)")
    parser.add_argument(
        "--max-iter", type=int, help="iterations per setting (default: the config's)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="run only these settings (see --list)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="train every setting with this many seeds (train.seed, train.seed + 1, ...) and "
        "report mean, standard deviation and each seed's AP",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="print the grid's setting names (without --grid: every grid with its settings)",
    )
    parser.add_argument(
        "--retry-failed", action="store_true", help="train settings that failed before again"
    )
    add_device(parser)
    add_overrides(parser)


def run(args: argparse.Namespace) -> int:
    if args.list and args.grid is None:
        for name, spec in GRIDS.items():
            print(f"{name}: {spec.description}")
            print("".join(f"  {setting.name}\n" for setting in spec.settings), end="")
        return 0
    args.grid = args.grid or "table1b"
    grid = get_grid(args.grid)
    if args.list:
        print("\n".join(setting.name for setting in grid.settings))
        return 0
    if args.config is None or args.output_dir is None:
        raise ValueError("--config and --output-dir are required (except with --list)")
    run_ablation(
        args.config,
        args.output_dir,
        args.grid,
        overrides=args.overrides,
        max_iter=args.max_iter,
        only=args.only,
        retry_failed=args.retry_failed,
        device=args.device,
        seeds=args.seeds,
    )
    if is_main_process():
        print((Path(args.output_dir) / "ablation.md").read_text(encoding="utf-8"), end="")
    # A failed setting is a result of the grid (recorded in the table), not an error of the run.
    return 0

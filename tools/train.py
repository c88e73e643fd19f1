r"""Train a RetinaNet.

    python tools/train.py --config configs/shapes.yaml --output-dir runs/shapes
    python tools/train.py --config configs/retinanet_R50_FPN_1x.yaml --output-dir runs/r50 \
        train.batch_size=8
    torchrun --nproc-per-node 8 tools/train.py --config configs/retinanet_R50_FPN_1x.yaml \
        --output-dir runs/r50
    python tools/train.py --config ... --output-dir runs/r50 --resume     # continue after a crash

Trailing key=value arguments override config keys (an unknown key is an error naming it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.config import ConfigError, load_config  # noqa: E402
from retinanet.data import DatasetError  # noqa: E402
from retinanet.engine.distributed import shutdown_distributed  # noqa: E402
from retinanet.engine.signals import TrainingInterrupted  # noqa: E402
from retinanet.engine.trainer import NonFiniteLossError, train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where checkpoints and logs go (default runs/<config name>)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --output-dir"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ..."
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="ITER",
        help="stop after ITER iterations as if interrupted",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or str(Path("runs") / Path(args.config).stem)
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(
            cfg,
            output_dir,
            resume=args.resume,
            device=args.device,
            stop_at_iteration=args.stop_at,
            evaluate=not args.no_eval,
        )
    except TrainingInterrupted as stopped:
        print(str(stopped), file=sys.stderr)
        return stopped.exit_code
    except (
        ConfigError,
        DatasetError,
        NonFiniteLossError,
        OSError,  # a full disk, a folder that cannot be written
        ValueError,
        RuntimeError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    if result.metrics is not None:
        m = result.metrics
        print(f"final AP {m.AP:.4f}  AP50 {m.AP50:.4f}  -> {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

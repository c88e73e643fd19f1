r"""Convert torchvision or Detectron2 RetinaNet weights into a checkpoint of this project.

    python tools/convert.py --from torchvision retinanet_resnet50_fpn_coco-eeacb38b.pth \
        --output weights/tv_r50.pth
    python tools/convert.py --from detectron2 model_final.pkl --output weights/d2_r50.pth

The checkpoint embeds the matching config (configs/torchvision_retinanet_R50_FPN[_v2].yaml or
configs/detectron2_retinanet_R50_FPN.yaml) and the class names; use it with tools/eval.py and
tools/predict.py (--config may then be omitted).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.engine.conversion import SOURCES, convert_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES)
    parser.add_argument("src", help="torchvision .pth state dict or Detectron2 model_final.pkl")
    parser.add_argument("--output", required=True, help="checkpoint to write")
    parser.add_argument(
        "--config", default=None, help="config of the architecture (default: per source)"
    )
    args = parser.parse_args(argv)
    try:
        cfg, classes = convert_checkpoint(args.source, args.src, args.output, args.config)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.output}: {classes.num_classes} classes, "
        f"ResNet-{cfg.model.backbone.depth}, P6 from {cfg.model.fpn.p6_source}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

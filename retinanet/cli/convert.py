r"""Convert torchvision or Detectron2 RetinaNet weights into a checkpoint of this project.

    retinanet convert --from torchvision retinanet_resnet50_fpn_coco-eeacb38b.pth \
        --output weights/tv_r50.pth
    retinanet convert --from detectron2 model_final.pkl --output weights/d2_r50.pth

The checkpoint embeds the matching config (configs/torchvision_retinanet_R50_FPN[_v2].yaml or
configs/detectron2_retinanet_R50_FPN.yaml) and the class names; use it with tools/eval.py and
tools/predict.py (--config may then be omitted).
"""

from __future__ import annotations

import argparse

from retinanet.engine.checkpoint_conversion import SOURCES, convert_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES)
    parser.add_argument("src", help="torchvision .pth state dict or Detectron2 model_final.pkl")
    parser.add_argument("--output", required=True, help="checkpoint to write")
    parser.add_argument("--config", help="config of the architecture (default: per source)")


def run(args: argparse.Namespace) -> int:
    cfg, classes = convert_checkpoint(args.source, args.src, args.output, args.config)
    print(
        f"wrote {args.output}: {classes.num_classes} classes, "
        f"ResNet-{cfg.model.backbone.depth}, P6 from {cfg.model.fpn.p6_source}"
    )
    return 0

"""Export of a trained RetinaNet to one ONNX graph that holds the whole detector: normalisation,
padding to the size divisibility, the backbone, FPN and head, anchors for the input's size,
decoding, score threshold, top-k per level and class-wise NMS.

Contract of the graph (also in the README and in the file's metadata):
    input  images          float32 (N, 3, H, W), RGB, 0-255, already resized by the caller
    output boxes           float32 (N, D, 4), xyxy in input pixels
           scores          float32 (N, D), decreasing
           labels          int64 (N, D), dataset category ids
           num_detections  int64 (N,); rows from num_detections on are padding (0, 0, -1)
D is the model's max_detections; H and W are free; N is free or fixed at export.

Exporter: the TorchScript-based one (torch.onnx.export(dynamo=False)). With PyTorch 2.14 it
needs nothing beyond `onnx`, and its tracer records every read of a shape as graph arithmetic,
so the padding amounts, anchor grids and each level's top-k of min(k, anchors x classes)
follow H and W; class-wise NMS is one ONNX NonMaxSuppression node through an autograd
Function's `symbolic`. The dynamo exporter would need `onnxscript` besides (not installed
here, so not tried), an onnxscript translation for that NMS, and dynamic-shape handling for
the data-dependent number of NMS survivors. The tracer freezes what is computed in Python,
which is why the postprocessing has an export path (`DetectionPostprocessor.padded`) without
Python decisions, and why `export_onnx` refuses to write a file when the trace warns that a
value was frozen (PyTorch's own batch-size check, which only raises, excepted).
"""

from __future__ import annotations

import copy
import inspect
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__
from ..data.classes import ClassInfo
from ..model.retinanet import RetinaNet

INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")
DEFAULT_OPSET = 17


class ExportableRetinaNet(nn.Module):
    """RetinaNet from input pixels to padded detections, written so that a trace of it holds
    for every input size: sizes are read from tensor shapes (the tracer records those reads)
    and nothing is decided in Python from a size or a value.

    forward(images) -> (boxes, scores, labels, num_detections) as in the module docstring.

    Args:
        model: a trained RetinaNet (eval mode).
        size_divisibility: the padded input's sides are multiples of this (the config's
            input.size_divisibility).
        category_ids: dataset category id of each contiguous class index.
    """

    def __init__(self, model: RetinaNet, size_divisibility: int, category_ids: Sequence[int]):
        super().__init__()
        if len(category_ids) != model.num_classes:
            raise ValueError(
                f"{len(category_ids)} category ids for a model of {model.num_classes} classes"
            )
        self.model = model
        self.size_divisibility = int(size_divisibility)
        self.register_buffer(
            "category_ids", torch.tensor(list(category_ids), dtype=torch.int64), False
        )

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        model, d = self.model, self.size_divisibility
        height, width = images.shape[-2:]  # 0-dim tensors while tracing
        x = (images - model.pixel_mean) / model.pixel_std
        # Zeros after normalisation = padding with the mean colour, as RetinaNet.normalize does.
        x = F.pad(x, (0, (-width) % d, 0, (-height) % d))
        features = model.fpn(model.backbone(x))
        head = [model.head([f]) for f in features]  # per level: the head is shared by levels
        generator = model.anchor_generator
        feature_sizes = [tuple(f.shape[-2:]) for f in features]
        strides = generator.level_strides(tuple(x.shape[-2:]), feature_sizes)
        levels = zip(generator.cell_anchors, feature_sizes, strides, strict=True)
        anchors = [generator._grid_anchors(c.to(x.device), size, s) for c, size, s in levels]
        image_size = torch._shape_as_tensor(images)[2:].to(x.device)[None]  # (1, 2) (H, W)
        detections = model.postprocessor.padded(
            [cls for cls, _ in head], [box for _, box in head], anchors, image_size
        )
        labels = self.category_ids[detections.labels.clamp(min=0)]
        labels = torch.where(detections.labels >= 0, labels, -1)
        return detections.boxes, detections.scores, labels, detections.num_detections


def _only_checks(warning: warnings.WarningMessage) -> bool:
    """Whether a TracerWarning comes from PyTorch's batch-size check (group_norm runs it), which
    reads traced sizes into Python only to raise an error: no value of the graph depends on it."""
    check = getattr(F, "_verify_batch_size", None)
    if check is None:
        return False
    lines, first = inspect.getsourcelines(check)
    same_file = Path(warning.filename).resolve() == Path(inspect.getsourcefile(check)).resolve()
    return same_file and first <= warning.lineno < first + len(lines)


def onnx_metadata(
    model: RetinaNet, classes: ClassInfo, size_divisibility: int, min_size: int, max_size: int
) -> dict[str, str]:
    """The key/value metadata stored in the ONNX file: classes, the test-time resize the caller
    must apply, and the postprocessing settings baked into the graph."""
    post = model.postprocessor
    return {
        "class_names": json.dumps(list(classes.names)),
        "category_ids": json.dumps([int(c) for c in classes.category_ids]),
        "min_size": str(int(min_size)),
        "max_size": str(int(max_size)),
        "resize": (
            "scale = min(min_size / min(h, w), max_size / max(h, w)); new size "
            "(round(h * scale), round(w * scale)); bilinear (cv2.INTER_LINEAR)"
        ),
        "size_divisibility": str(int(size_divisibility)),
        "score_threshold": str(post.score_threshold),
        "nms_threshold": str(post.nms_threshold),
        "topk_candidates": str(post.topk_candidates),
        "max_detections": str(post.max_detections),
        "input": "images: float32 (N, 3, H, W), RGB, 0-255, resized by the caller",
        "outputs": (
            "boxes: float32 (N, D, 4) xyxy in input pixels; scores: float32 (N, D); labels: "
            "int64 (N, D) category ids; num_detections: int64 (N,); rows past num_detections "
            "are padding"
        ),
        "retinanet_version": __version__,
    }


def export_onnx(
    model: RetinaNet,
    output: str | Path,
    classes: ClassInfo,
    size_divisibility: int,
    min_size: int,
    max_size: int,
    opset: int = DEFAULT_OPSET,
    batch_size: int | None = None,
) -> Path:
    """Write `model` as an ONNX file: a copy of it on the CPU in fp32, in eval mode, with its
    backbone's BatchNorms folded into the convolutions (`RetinaNet.fold_norms`); `model` itself
    is left as it is. batch_size None = dynamic.
    min_size, max_size: the test-time resize (input.test_min_size / test_max_size), stored
    in the metadata for the caller. Returns the path."""
    import onnx  # the export extra: pip install -e ".[export]"

    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch size must be >= 1 or dynamic, got {batch_size}")
    if opset < 11:
        raise ValueError(f"opset {opset} is too old: NonMaxSuppression and dynamic TopK need 11+")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).float().cpu().eval().fold_norms()
    wrapper = ExportableRetinaNet(model, size_divisibility, classes.category_ids).eval()
    # A trace input whose sides are not multiples of the divisibility (the padding is traced
    # non-zero) and a batch of 2 unless fixed (nothing specialises on a batch of one).
    d = max(size_divisibility, 32)
    example = torch.rand(batch_size or 2, 3, 2 * d + 5, 3 * d - 7) * 255
    dynamic_axes = {INPUT_NAME: {2: "height", 3: "width"}}
    if batch_size is None:
        dynamic_axes[INPUT_NAME][0] = "batch"
        for name in OUTPUT_NAMES:
            dynamic_axes[name] = {0: "batch"}
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.onnx.export(
            wrapper,
            (example,),
            str(output),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
    frozen = [
        w for w in caught if issubclass(w.category, torch.jit.TracerWarning) and not _only_checks(w)
    ]
    for w in caught:
        # The exporter's deprecation notices are known (see the module docstring); any other
        # warning is passed on.
        if not issubclass(w.category, (torch.jit.TracerWarning, DeprecationWarning, FutureWarning)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if frozen:
        output.unlink(missing_ok=True)
        raise RuntimeError(
            "the traced graph would only hold for the traced input size: "
            + "; ".join(f"{w.filename}:{w.lineno}: {w.message}" for w in frozen[:3])
        )
    exported = onnx.load(str(output))
    metadata = onnx_metadata(model, classes, size_divisibility, min_size, max_size)
    onnx.helper.set_model_props(exported, metadata)
    exported.doc_string = "RetinaNet detector; metadata 'input' and 'outputs' give the contract"
    onnx.checker.check_model(exported)
    onnx.save(exported, str(output))
    return output

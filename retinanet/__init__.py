"""RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection"): model, training,
evaluation and analysis of the focal loss.

`from retinanet import Detector` gives the Python inference API (retinanet/detector.py)."""

from __future__ import annotations

from typing import Any

__version__ = "0.3.0"

__all__ = ["Detections", "Detector", "__version__"]


# The exported classes are imported on first use: `import retinanet` (the command line's start,
# `retinanet --version`, setuptools reading __version__) must not pay for importing torch.
def __getattr__(name: str) -> Any:
    if name in ("Detector", "Detections"):
        from . import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'retinanet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

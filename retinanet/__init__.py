"""RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection"): model, training,
evaluation and analysis of the focal loss."""

__version__ = "0.3.0"

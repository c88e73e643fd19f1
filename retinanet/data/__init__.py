"""Data: COCO-format datasets, the synthetic shapes dataset, augmentation, samplers, batching."""

from retinanet.data.coco import CocoDetection, DatasetError, DatasetWarning
from retinanet.data.collate import Batch, collate_detection
from retinanet.data.loader import create_test_loader, create_train_loader
from retinanet.data.sampler import InferenceSampler, TrainingBatchSampler, training_stream
from retinanet.data.shapes import SHAPE_NAMES, ShapesPaths, ensure_shapes_dataset
from retinanet.data.transforms import DetectionTransform, resized_shape

__all__ = [
    "SHAPE_NAMES",
    "Batch",
    "CocoDetection",
    "DatasetError",
    "DatasetWarning",
    "DetectionTransform",
    "InferenceSampler",
    "ShapesPaths",
    "TrainingBatchSampler",
    "create_test_loader",
    "create_train_loader",
    "collate_detection",
    "ensure_shapes_dataset",
    "resized_shape",
    "training_stream",
]

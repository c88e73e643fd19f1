"""Other annotation formats converted to COCO instances JSON, which the loaders read: Pascal VOC
XML, YOLO text labels and keras-retinanet's CSV list (`retinanet convert-dataset`)."""

from retinanet.data.formats.coco_writer import to_coco, write_coco
from retinanet.data.formats.csv_format import read_classes_csv, read_csv_dataset
from retinanet.data.formats.records import ConvertedDataset, ImageRecord, read_names
from retinanet.data.formats.voc import read_voc
from retinanet.data.formats.yolo import read_yolo

__all__ = [
    "ConvertedDataset",
    "ImageRecord",
    "read_classes_csv",
    "read_csv_dataset",
    "read_names",
    "read_voc",
    "read_yolo",
    "to_coco",
    "write_coco",
]

"""Datasets: the shapes world, COCO-OVD and LVIS-OVD converters, image decoding, catalog."""

from ovdlab.platform.data.catalog import OVDDataset, ensure_dataset, load_dataset
from ovdlab.platform.data.coco_ovd import BASE_IDS, NOVEL_IDS, convert_coco_ovd
from ovdlab.platform.data.images import DecodedImage, ImageDecodeError, load_image, read_image
from ovdlab.platform.data.lvis_ovd import convert_lvis_ovd
from ovdlab.platform.data.shapes import COLOR_NAMES, SHAPE_NAMES, class_names, generate_shapes

__all__ = [
    "BASE_IDS",
    "COLOR_NAMES",
    "NOVEL_IDS",
    "SHAPE_NAMES",
    "DecodedImage",
    "ImageDecodeError",
    "OVDDataset",
    "class_names",
    "convert_coco_ovd",
    "convert_lvis_ovd",
    "ensure_dataset",
    "generate_shapes",
    "load_dataset",
    "load_image",
    "read_image",
]

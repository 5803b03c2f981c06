"""Two-stage open-vocabulary detector from torchvision parts (see ``model.py``).

Backbone (ResNet + FPN or C4), torchvision RPN, OVD RoI heads calling the method's
classifier against a frozen text bank; the data path that resizes and flips images
together with their ground-truth and distillation boxes; inference helpers.
"""

from ovdlab.platform.detector.backbone import Backbone, build_backbone
from ovdlab.platform.detector.data import DetectionDataset, collate_fn, image_to_tensor, targets_to
from ovdlab.platform.detector.inference import detections_to_coco, predict_images, propose_images
from ovdlab.platform.detector.model import OVDDetector, build_detector
from ovdlab.platform.detector.roi_heads import OVDRoIHeads
from ovdlab.platform.detector.transforms import hflip, resize, resized_shape, scale_boxes

__all__ = [
    "Backbone",
    "DetectionDataset",
    "OVDDetector",
    "OVDRoIHeads",
    "build_backbone",
    "build_detector",
    "collate_fn",
    "detections_to_coco",
    "hflip",
    "image_to_tensor",
    "predict_images",
    "propose_images",
    "resize",
    "resized_shape",
    "scale_boxes",
    "targets_to",
]

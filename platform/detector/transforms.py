"""Geometric augmentation of an image together with every box set drawn on it.

One call transforms the image and all its box sets (ground truth, distillation
regions, ...) so they cannot drift apart; LP-OVOD's latest pipeline forgot to resize
and flip its distillation proposals with the image (see docs/methods.md), which this
design rules out. Boxes are ``[N, 4]`` xyxy in continuous pixel coordinates (pixel
``i`` covers ``[i, i + 1)``), the convention of detectron2 and torchvision.

Normalization and padding are the model's (``OVDDetector``), not the data path's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Boxes = dict[str, Tensor]


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge.get_output_shape``: shorter side to ``min_size``,
    longer side capped at ``max_size``, rounded to the nearest integer."""
    scale = min_size / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        cap = max_size / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return int(new_h + 0.5), int(new_w + 0.5)


def scale_boxes(boxes: Tensor, scale_x: float, scale_y: float) -> Tensor:
    """Multiply x coordinates by ``scale_x`` and y coordinates by ``scale_y``."""
    factors = torch.tensor([scale_x, scale_y, scale_x, scale_y], dtype=boxes.dtype, device=boxes.device)
    return boxes * factors


def resize(image: Tensor, boxes: Boxes, min_size: int, max_size: int) -> tuple[Tensor, Boxes, tuple[float, float]]:
    """Resize ``image`` ``[3, H, W]`` (float) and every box set alike.

    Returns the resized image, the rescaled box sets and ``(scale_x, scale_y)``: the
    exact per-axis factors ``new_w / W`` and ``new_h / H`` applied to the boxes (they
    differ from the nominal scale by the rounding of the output size, as in
    detectron2's ``ResizeTransform``). Bilinear with antialiasing, so downscaling
    averages like PIL's resize rather than aliasing.
    """
    if image.ndim != 3:
        raise ValueError(f"resize expects an image [C, H, W], got shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    new_h, new_w = resized_shape(height, width, min_size, max_size)
    if (new_h, new_w) != (height, width):
        image = F.interpolate(
            image[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )[0]
    scale_x, scale_y = new_w / width, new_h / height
    return image, {name: scale_boxes(b, scale_x, scale_y) for name, b in boxes.items()}, (scale_x, scale_y)


def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror xyxy boxes in an image ``width`` pixels wide: ``x -> width - x``."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def hflip(image: Tensor, boxes: Boxes) -> tuple[Tensor, Boxes]:
    """Flip ``image`` ``[C, H, W]`` left-right and every box set with it."""
    width = image.shape[-1]
    return image.flip(-1), {name: hflip_boxes(b, width) for name, b in boxes.items()}

"""Region embeddings: crops cut on the decoded image tensor, batched through the image tower.

Crops are taken with :func:`torchvision.ops.roi_align` on the whole image (``aligned=True``
so a box edge at pixel coordinate x sits at continuous coordinate x, pixel centres at
i + 0.5, as PIL uses) straight to ``teacher.image_size`` squared. ``sampling_ratio=-1``
lets roi_align take ceil(box side / output side) bilinear samples per output bin and
average them: for a box larger than the output this is an area average, the antialiasing
that PIL's bilinear resize applies when it shrinks (its triangle filter widens with the
scale); for a smaller box it is one bilinear sample at the bin centre, which is plain
bilinear upsampling. So the batched path reproduces "crop with PIL, resize bilinear"
without per-crop PIL round trips (tests/platform/teacher/test_teacher_regions.py measures
the difference).

Crop recipes (docs/methods.md):

- ``plain``: the box, clipped to the image (CLIFF).
- ``1x+1.5x``: the box and the box scaled 1.5x about its centre, both clipped to the
  image; the two embeddings are summed and L2-normalised (ViLD, LP-OVOD).
- ``1.2x-square``: the box scaled 1.2x about its centre, then grown to a square on its
  longer side; parts outside the image are zero pixels (black) before CLIP normalisation,
  i.e. zero padding (EZSD; see :func:`roi_crops` for how roi_align is made to do it).

CLIP mean/std normalisation is applied after cropping, on pixel values in [0, 1].
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.ops import roi_align

from ovdlab.platform.data.images import load_image
from ovdlab.platform.teacher.loading import Teacher

Crop = Literal["plain", "1x+1.5x", "1.2x-square"]
CROPS: tuple[str, ...] = ("plain", "1x+1.5x", "1.2x-square")


def image_tensor(path: str | Path) -> torch.Tensor:
    """A decoded image file as a uint8 [3, H, W] tensor (raises ``ImageDecodeError`` naming it)."""
    return torch.from_numpy(np.array(load_image(path), copy=True)).permute(2, 0, 1).contiguous()


def scale_boxes(boxes: torch.Tensor, factor: float) -> torch.Tensor:
    """Boxes (xyxy) scaled by ``factor`` about their centres."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)
    return torch.cat([centre - half, centre + half], dim=1)


def square_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes grown to squares on their longer side, same centres."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = (boxes[:, 2:] - boxes[:, :2]).max(dim=1, keepdim=True).values
    return torch.cat([centre - side / 2, centre + side / 2], dim=1)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    x = boxes[:, 0::2].clamp(0, width)
    y = boxes[:, 1::2].clamp(0, height)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def _check_inputs(image: torch.Tensor, boxes: torch.Tensor, index: int) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image {index}: expected a uint8 [3, H, W] tensor, got {image.dtype} {tuple(image.shape)}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"image {index}: boxes must be [N, 4] xyxy, got {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError(f"image {index}: boxes contain NaN or inf")
    height, width = image.shape[1:]
    clipped = clip_boxes(boxes.float(), height, width)
    empty = ((clipped[:, 2] - clipped[:, 0]) <= 0) | ((clipped[:, 3] - clipped[:, 1]) <= 0)
    if empty.any():
        j = int(empty.nonzero()[0])
        raise ValueError(
            f"image {index}: box {j} {boxes[j].tolist()} is empty or outside the {width}x{height} image"
        )


def view_boxes(boxes: torch.Tensor, crop: str, height: int, width: int) -> list[torch.Tensor]:
    """The crop boxes of each view of ``crop`` (one view, or two for ``1x+1.5x``)."""
    boxes = boxes.float()
    if crop == "plain":
        return [clip_boxes(boxes, height, width)]
    if crop == "1x+1.5x":
        return [clip_boxes(boxes, height, width), clip_boxes(scale_boxes(boxes, 1.5), height, width)]
    if crop == "1.2x-square":
        return [square_boxes(scale_boxes(boxes, 1.2))]
    raise ValueError(f"unknown crop recipe {crop!r}; choose one of {CROPS}")


def _normalize(crops: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=crops.dtype, device=crops.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=crops.dtype, device=crops.device).view(1, 3, 1, 1)
    return (crops - m) / s


def roi_crops(
    image: torch.Tensor, rois: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float], zero_pad: bool
) -> torch.Tensor:
    """[K, 3, size, size] normalised crops of the xyxy ``rois`` of one uint8 [3, H, W] image.

    ``zero_pad``: parts of a roi outside the image are black. roi_align already returns 0
    for samples more than one pixel outside its input but clamps nearer ones to the
    border pixel, so the image gets a one-pixel black frame first.
    """
    pixels = image.unsqueeze(0).float() / 255.0
    rois = rois.to(pixels.device, torch.float32)
    if zero_pad:
        pixels = F.pad(pixels, (1, 1, 1, 1))
        rois = rois + 1.0
    crops = roi_align(pixels, [rois], output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return _normalize(crops, mean, std)


def crop_regions(
    image: torch.Tensor, boxes: torch.Tensor, crop: str, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """[V * N, 3, size, size] normalised crops of one uint8 [3, H, W] image (view-major)."""
    height, width = image.shape[1:]
    views = view_boxes(boxes.to(image.device), crop, height, width)
    return roi_crops(image, torch.cat(views), size, mean, std, zero_pad=crop == "1.2x-square")


def combine_views(embeddings: torch.Tensor, views: int) -> torch.Tensor:
    """[V * N, D] per-view embeddings -> [N, D]: summed over views and L2-normalised (ViLD)."""
    n = embeddings.shape[0] // views
    return F.normalize(embeddings.view(views, n, -1).sum(dim=0), dim=-1)


def num_views(crop: str) -> int:
    if crop not in CROPS:
        raise ValueError(f"unknown crop recipe {crop!r}; choose one of {CROPS}")
    return 2 if crop == "1x+1.5x" else 1


def embed_regions(
    teacher: Teacher,
    images: list[torch.Tensor],
    boxes: list[torch.Tensor],
    crop: Crop,
    batch_size: int,
) -> list[torch.Tensor]:
    """Teacher embeddings [N_i, D] (normalised, float32, CPU) of every box of every image.

    Crops of consecutive images are pooled until ``batch_size`` are waiting, then go
    through the image tower together, so many small images still make full batches.
    """
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images but {len(boxes)} box lists")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    views = num_views(crop)
    results: list[torch.Tensor | None] = [None] * len(images)
    waiting: list[tuple[int, torch.Tensor]] = []
    pending = 0

    def flush() -> None:
        nonlocal pending
        if not waiting:
            return
        embs = teacher.encode_crops(torch.cat([c for _, c in waiting]))
        start = 0
        for index, crops in waiting:
            count = crops.shape[0]
            results[index] = combine_views(embs[start : start + count], views)
            start += count
        waiting.clear()
        pending = 0

    for index, (image, image_boxes) in enumerate(zip(images, boxes)):
        _check_inputs(image, image_boxes, index)
        if image_boxes.shape[0] == 0:
            results[index] = torch.zeros(0, teacher.embed_dim)
            continue
        crops = crop_regions(
            image.to(teacher.device), image_boxes, crop, teacher.image_size, teacher.mean, teacher.std
        )
        waiting.append((index, crops))
        pending += crops.shape[0]
        if pending >= batch_size:
            flush()
    flush()
    return [r for r in results if r is not None]


def pil_reference_crops(
    image: torch.Tensor, boxes: torch.Tensor, crop: str, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """The straightforward per-crop path, for tests: PIL crop, bilinear resize, normalise.

    Each crop box (same :func:`view_boxes` as the batched path) is resized with
    ``Image.resize(..., BILINEAR, box=...)`` on the image padded with black wherever
    the box leaves it, which is the zero padding of ``1.2x-square``.
    """
    height, width = image.shape[1:]
    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    out = []
    for box in torch.cat(view_boxes(boxes, crop, height, width)).tolist():
        x0, y0, x1, y1 = box
        margin = math.ceil(max(0.0, -x0, -y0, x1 - width, y1 - height))
        padded = ImageOps.expand(pil, border=margin, fill=0) if margin else pil
        resized = padded.resize(
            (size, size), Image.Resampling.BILINEAR, box=(x0 + margin, y0 + margin, x1 + margin, y1 + margin)
        )
        out.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return _normalize(torch.stack(out), mean, std)

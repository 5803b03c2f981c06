"""Region embeddings: crops cut from the decoded image tensor, batched through the image tower.

A crop is what ``image.crop(box).resize((S, S), BILINEAR)`` gives with Pillow, and what
torchvision's ``resized_crop`` gives on a uint8 tensor: the box's edges are rounded to
whole pixels (:func:`pixel_windows`, Pillow's rounding), the window is cut out, parts
outside the image are black, and the window is resized to ``teacher.image_size`` squared
with the antialiased bilinear (triangle) filter, whose support widens with the shrink
factor. The resize is ``F.interpolate(..., antialias=True)`` on a window view of the
uint8 image in channels-last layout (torch's vectorised port of Pillow's resampler), so
no per-crop PIL image or float array is made; the uint8 crops of a whole image are then
normalised together, in place in the output tensor
(tests/platform/teacher/test_teacher_regions.py checks the result against Pillow to
within two uint8 levels; ``jobs/bench_extract.py`` measures the speed).

Crop recipes (docs/methods.md):

- ``plain``: the box, clipped to the image (CLIFF).
- ``1x+1.5x``: the box and the box scaled 1.5x about its centre, both clipped to the
  image; the two embeddings are summed and L2-normalised (ViLD, LP-OVOD).
- ``1.2x-square``: the box scaled 1.2x about its centre, then grown to a square on its
  longer side; parts outside the image are zero pixels (black) before CLIP normalisation,
  i.e. zero padding (EZSD).

CLIP mean/std normalisation is applied after cropping, on pixel values in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

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


def pixel_windows(boxes: torch.Tensor) -> torch.Tensor:
    """Integer crop windows [N, 4] (x0, y0, x1, y1) of float xyxy boxes.

    Edges are rounded to the nearest pixel boundary, halves to even, as Pillow's
    ``Image.crop`` rounds a float box; a window is at least one pixel wide and high, so a
    sub-pixel box still yields a crop.
    """
    windows = boxes.round().long()
    windows[:, 2:] = torch.maximum(windows[:, 2:], windows[:, :2] + 1)
    return windows


def _normalize(crops: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=crops.dtype, device=crops.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=crops.dtype, device=crops.device).view(1, 3, 1, 1)
    return (crops - m) / s


def _normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[K, S, S, 3] pixel values in 0..255 -> [K, 3, S, S] float32 ``(x / 255 - mean) / std``.

    Channel by channel, the uint8 -> float conversion with the layout change, then the
    affine map, happen in place in the fresh NCHW output: no float intermediate the size
    of the batch, whose first touch of memory would cost as much as the resizing.
    """
    out = torch.empty(pixels.shape[0], 3, pixels.shape[1], pixels.shape[2], device=pixels.device)
    for c in range(3):
        channel = out[:, c]
        channel.copy_(pixels[..., c])
        channel.mul_(1.0 / (255.0 * std[c])).sub_(mean[c] / std[c])
    return out


def roi_crops(
    image: torch.Tensor, rois: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """[K, 3, size, size] normalised crops of the xyxy ``rois`` of one uint8 [3, H, W] image.

    Each roi's :func:`pixel_windows` window is resized with torch's antialiased bilinear
    filter (on CUDA, where that filter has no uint8 kernel, on float pixel values);
    window parts outside the image are black (the image is zero-padded once, by the
    farthest overhang).
    """
    height, width = image.shape[1:]
    windows = pixel_windows(rois)
    if windows.numel() == 0:
        return torch.zeros(0, 3, size, size, device=image.device)
    overhang = torch.cat([-windows[:, :2], windows[:, 2:3] - width, windows[:, 3:4] - height], dim=1)
    margin = max(0, int(overhang.max()))
    source = image.unsqueeze(0)
    if margin:
        source = F.pad(source, (margin, margin, margin, margin))
    if source.device.type != "cpu":
        source = source.float()
    source = source.contiguous(memory_format=torch.channels_last)
    resized = [
        F.interpolate(source[:, :, y0:y1, x0:x1], size=(size, size), mode="bilinear", antialias=True)
        for x0, y0, x1, y1 in (windows + margin).tolist()
    ]
    return _normalize_pixels(torch.cat(resized).permute(0, 2, 3, 1), mean, std)


def crop_regions(
    image: torch.Tensor, boxes: torch.Tensor, crop: str, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """[V * N, 3, size, size] normalised crops of one uint8 [3, H, W] image (view-major)."""
    height, width = image.shape[1:]
    views = view_boxes(boxes.to(image.device), crop, height, width)
    return roi_crops(image, torch.cat(views), size, mean, std)


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
    """The straightforward per-crop path, for tests and the benchmark: Pillow crop + bilinear resize.

    The same crop windows as the batched path (:func:`view_boxes`, :func:`pixel_windows`);
    ``Image.crop`` fills the parts of a window outside the image with black, which is the
    zero padding of ``1.2x-square``.
    """
    height, width = image.shape[1:]
    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    out = []
    for window in pixel_windows(torch.cat(view_boxes(boxes, crop, height, width))).tolist():
        resized = pil.crop(tuple(window)).resize((size, size), Image.Resampling.BILINEAR)
        out.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return _normalize(torch.stack(out), mean, std)

"""Training/evaluation data path: dataset images + annotations (+ region store) -> targets.

Every item is ``(image, target)``: a float ``[3, H, W]`` image in 0..1, resized
(detectron2 ``ResizeShortestEdge``) and, in training, flipped with probability 0.5,
and a target whose boxes went through the very same transform call as the image:

- ``boxes`` ``[N, 4]`` xyxy and ``labels`` ``[N]`` (``1 + index`` of the category in
  the vocabulary; annotations of other categories and crowd boxes are dropped, as
  detectron2 drops ``iscrowd`` boxes from training);
- ``distill_boxes`` ``[M, 4]``, ``distill_embeddings`` ``[M, D]`` (float32) and
  ``distill_weights`` ``[M]`` from the region store (only when a store is given and
  holds the image): the store's boxes are in original pixels and are clipped to the
  image, empty ones dropped; every row the store marks as ground truth kept and at most
  ``max_distill`` proposals (a random subset in training unless ``distill_order`` is
  ``first``, the first ones, i.e. the store's order, in evaluation); weights are the store's
  ``confidence`` extra column when it has one (EZSD), else 1;
- ``image_id``, ``orig_size`` ``(H, W)``, ``scale`` ``(scale_x, scale_y)`` and ``flipped``.

Images without annotations are kept: they still carry distillation regions and
background. A file that cannot be decoded, or whose size differs from the annotation
file's, raises :class:`~ovdlab.platform.data.images.ImageDecodeError` naming it; the
train loop decides whether to skip.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ovdlab.platform.data.images import ImageDecodeError, load_image
from ovdlab.platform.detector.transforms import hflip, resize
from ovdlab.platform.proposals.base import GROUND_TRUTH_COLUMN

CONFIDENCE_COLUMN = "confidence"


class _Catalog(Protocol):
    """What the data path uses of :class:`ovdlab.platform.data.catalog.OVDDataset`."""

    @property
    def image_ids(self) -> Sequence[int]: ...

    def image_path(self, image_id: int) -> Any: ...

    def annotations(self, image_id: int) -> list[dict[str, Any]]: ...

    def image_info(self, image_id: int) -> dict[str, Any]: ...


class _Store(Protocol):
    """What the data path uses of :class:`ovdlab.platform.store.reader.RegionStore`."""

    def __contains__(self, image_id: object) -> bool: ...

    def get(self, image_id: int) -> Any: ...


def image_to_tensor(image: np.ndarray) -> Tensor:
    """``H x W x 3`` uint8 -> float ``[3, H, W]`` in 0..1."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {image.dtype} {image.shape}")
    if not image.flags.writeable:  # decoded arrays may be read-only views; torch wants to own writable memory
        image = image.copy()
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def _clip_nonempty(boxes: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Clip xyxy boxes to the image; return them and the mask of those with area left."""
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes, keep


class DetectionDataset(Dataset):
    """Map-style dataset of detector inputs over an ``OVDDataset`` (see module doc).

    Args:
        dataset: the catalog (``OVDDataset``).
        class_ids: the vocabulary as category ids, row order of the text bank
            (training: the base ids).
        train: random horizontal flip (p = ``flip_prob``) and random distillation subset.
        min_size, max_size: ResizeShortestEdge sizes.
        store: optional region store with distillation boxes and teacher embeddings.
        max_distill: cap on distillation proposals per image (None: all); rows a
            store marks as ground truth (``ground_truth`` column, EZSD) are all kept.
        distill_order: ``random`` (a fresh subset each time in training) or ``first``
            (the store's first ones, i.e. the source's best: CLIFF's top proposals).
        pseudo_labels: extra COCO-style annotations by image id (a probe's
            pseudo-labels); when given, only the images that have one are used.
    """

    def __init__(
        self,
        dataset: _Catalog,
        class_ids: Sequence[int],
        train: bool,
        min_size: int,
        max_size: int,
        store: _Store | None = None,
        max_distill: int | None = None,
        distill_order: str = "random",
        flip_prob: float = 0.5,
        pseudo_labels: dict[int, list[dict[str, Any]]] | None = None,
    ) -> None:
        if len(set(class_ids)) != len(class_ids) or not class_ids:
            raise ValueError(f"class_ids must be a non-empty list without duplicates, got {list(class_ids)}")
        self.dataset = dataset
        self.class_ids = [int(c) for c in class_ids]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.class_ids)}
        self.pseudo_labels = pseudo_labels
        self.image_ids = [i for i in dataset.image_ids if pseudo_labels is None or i in pseudo_labels]
        if pseudo_labels is not None and not self.image_ids:
            raise ValueError("no image of the dataset has a pseudo-label")
        self.train = train
        self.min_size = min_size
        self.max_size = max_size
        self.store = store
        self.max_distill = max_distill
        self.distill_order = distill_order
        self.flip_prob = flip_prob

    def __len__(self) -> int:
        return len(self.image_ids)

    def ground_truth(self, image_id: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Boxes xyxy and labels of the vocabulary's non-crowd annotations (and pseudo-labels)."""
        boxes, labels = [], []
        pseudo = self.pseudo_labels.get(image_id, []) if self.pseudo_labels is not None else []
        for ann in [*self.dataset.annotations(image_id), *pseudo]:
            label = self.label_of.get(int(ann["category_id"]))
            if label is None or ann.get("iscrowd", 0):
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes.append([x, y, x + w, y + h])
            labels.append(label)
        box_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        box_t, keep = _clip_nonempty(box_t, height, width)
        return box_t[keep], torch.tensor(labels, dtype=torch.int64)[keep]

    def capped(self, index: Tensor) -> Tensor:
        """At most ``max_distill`` of the proposal rows ``index`` (store order): a fresh random
        subset each time in training with ``distill_order="random"``, else the first ones."""
        if self.max_distill is None or len(index) <= self.max_distill:
            return index
        if self.train and self.distill_order == "random":
            return index[torch.randperm(len(index))[: self.max_distill].sort().values]
        return index[: self.max_distill]

    def distillation(self, image_id: int, height: int, width: int) -> dict[str, Tensor] | None:
        """The store's regions of the image (clipped; every ground-truth row, the proposals
        capped by :meth:`capped`), or None without any."""
        if self.store is None or image_id not in self.store:
            return None
        regions = self.store.get(image_id)
        boxes = torch.tensor(np.asarray(regions.boxes), dtype=torch.float32).reshape(-1, 4)
        embeddings = torch.tensor(np.asarray(regions.embeddings), dtype=torch.float32)
        confidence = (regions.extras or {}).get(CONFIDENCE_COLUMN)
        weights = (
            torch.ones(len(boxes))
            if confidence is None
            else torch.tensor(np.asarray(confidence), dtype=torch.float32)
        )
        flags = (regions.extras or {}).get(GROUND_TRUTH_COLUMN)
        is_gt = torch.zeros(len(boxes), dtype=torch.bool) if flags is None else torch.tensor(np.asarray(flags)) > 0.5
        boxes, keep = _clip_nonempty(boxes, height, width)
        index = torch.where(keep)[0]
        index = torch.cat([index[is_gt[index]], self.capped(index[~is_gt[index]])])
        return {
            "distill_boxes": boxes[index],
            "distill_embeddings": embeddings[index],
            "distill_weights": weights[index],
        }

    def __getitem__(self, idx: int) -> tuple[Tensor, dict[str, Any]]:
        image_id = self.image_ids[idx]
        path = self.dataset.image_path(image_id)
        image = image_to_tensor(load_image(path))
        height, width = image.shape[-2:]
        info = self.dataset.image_info(image_id)
        if (int(info["height"]), int(info["width"])) != (height, width):
            # detectron2's check_image_size: boxes of a differently sized file would be wrong
            raise ImageDecodeError(
                path, f"decoded size {width}x{height} differs from the annotation file's {info['width']}x{info['height']}"
            )
        boxes, labels = self.ground_truth(image_id, height, width)
        box_sets = {"boxes": boxes}
        distill = self.distillation(image_id, height, width)
        if distill is not None:
            box_sets["distill_boxes"] = distill["distill_boxes"]
        flipped = self.train and bool(torch.rand(()) < self.flip_prob)
        if flipped:
            image, box_sets = hflip(image, box_sets)
        image, box_sets, scale = resize(image, box_sets, self.min_size, self.max_size)
        target: dict[str, Any] = {
            "boxes": box_sets["boxes"],
            "labels": labels,
            "image_id": image_id,
            "orig_size": (int(height), int(width)),
            "scale": scale,
            "flipped": flipped,
        }
        if distill is not None:
            target.update(distill, distill_boxes=box_sets["distill_boxes"])
        return image, target


def collate_fn(batch: list[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Keep images (of different sizes) and targets as lists, as the detector takes them."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def targets_to(targets: list[dict[str, Any]], device: torch.device | str) -> list[dict[str, Any]]:
    """Move the tensor fields of targets to ``device`` (other fields unchanged)."""
    return [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]

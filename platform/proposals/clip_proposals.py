"""CLIP proposals: dense anchors scored by the teacher (EZSD stages 2 and 3).

EZSD (Liu, Hu, Nevatia 2023; docs/methods.md) finds distillation regions without a
proposal network: every anchor of a dense grid (stride 32, sizes 32..512, ratios
0.5/1/2) is cropped and classified by the (LayerNorm-tuned) CLIP over *all* class
names, novel names included, and scored by how far its class distribution is from
uniform::

    p = softmax(s * cos(crop, text_c))_c          s = the teacher's logit scale (100 for CLIP)
    score = log C - H(p),   H(p) = -sum_c p_c log p_c

``log C`` is the entropy of the uniform distribution, so the score is the
distribution's KL divergence from uniform: 0 for a crop CLIP cannot tell apart from
background clutter, ``log C`` for a crop it is certain about. Then (stage 2)
class-agnostic NMS at ``nms_thresh``; (stage 3) boxes overlapping a base ground-truth
box with IoU >= ``drop_base_iou`` are dropped (those objects are already supervised),
and with ``drop_base_argmax`` so are boxes whose most likely class is a base class;
the ``per_image`` best remain. The maximum probability is kept per box as the
``confidence`` extra column (EZSD weights each box's distillation loss by it).

Anchors follow torchvision's ``AnchorGenerator`` geometry (for ratio r = h / w and size
s: ``w = s / sqrt(r)``, ``h = s * sqrt(r)``), centred on the cells of a stride grid
(``(i + 0.5) * stride``), clipped to the image; duplicates made by clipping are removed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou, nms

from ovdlab.platform.proposals.base import Proposals, xywh_to_xyxy

if TYPE_CHECKING:
    from ovdlab.platform.config import ExperimentConfig, TeacherConfig
    from ovdlab.platform.data.catalog import OVDDataset
    from ovdlab.platform.teacher.loading import Teacher

MIN_ANCHOR_SIDE = 2.0
"""Clipped anchors thinner than this (pixels) are dropped: a crop of a sliver says nothing."""
CONFIDENCE = "confidence"


def dense_anchors(
    height: int, width: int, stride: int, sizes: Sequence[int], ratios: Sequence[float], min_side: float = MIN_ANCHOR_SIDE
) -> np.ndarray:
    """float32 [A, 4] xyxy anchors on a ``stride`` grid over the image, clipped, unique.

    For each grid cell centre, one anchor per (size, ratio) with ``w = size / sqrt(ratio)``
    and ``h = size * sqrt(ratio)`` (torchvision's ``AnchorGenerator``).
    """
    if stride < 1 or not sizes or not ratios:
        raise ValueError(f"anchors need stride >= 1 and at least one size and ratio, got {stride}, {sizes}, {ratios}")
    cx = (np.arange(math.ceil(width / stride), dtype=np.float64) + 0.5) * stride
    cy = (np.arange(math.ceil(height / stride), dtype=np.float64) + 0.5) * stride
    shapes = np.array([(s / math.sqrt(r), s * math.sqrt(r)) for s in sizes for r in ratios], dtype=np.float64)
    gx, gy = np.meshgrid(cx, cy)
    centres = np.stack([gx.ravel(), gy.ravel()], axis=1)
    half = shapes / 2
    boxes = np.concatenate(
        [centres[:, None, :] - half[None, :, :], centres[:, None, :] + half[None, :, :]], axis=2
    ).reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_side) & ((boxes[:, 3] - boxes[:, 1]) >= min_side)
    boxes = boxes[keep].astype(np.float32)
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]


def proposal_scores(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(score, confidence, argmax) of class distributions ``probs`` [N, C].

    ``score = log C - H(p)`` with ``0 log 0 = 0``; ``confidence = max_c p_c``.
    """
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ValueError(f"probs must be [N, C] with C >= 1, got {tuple(probs.shape)}")
    probs = probs.double()
    plogp = torch.where(probs > 0, probs * torch.log(probs.clamp_min(1e-300)), torch.zeros_like(probs))
    entropy = -plogp.sum(dim=1)
    score = math.log(probs.shape[1]) - entropy
    confidence, argmax = probs.max(dim=1)
    return score.float(), confidence.float(), argmax


def select_proposals(
    boxes: torch.Tensor,
    probs: torch.Tensor,
    *,
    nms_thresh: float,
    per_image: int,
    base_classes: torch.Tensor,
    base_gt_boxes: torch.Tensor | None = None,
    drop_base_iou: float | None = None,
    drop_base_argmax: bool = False,
) -> Proposals:
    """EZSD's selection from scored anchors: NMS, base removals, top ``per_image``.

    Args:
        boxes: [N, 4] xyxy anchors.
        probs: [N, C] class probabilities of each anchor's crop.
        base_classes: [C] bool, True for the vocabulary's base classes.
        base_gt_boxes: [M, 4] xyxy base ground truth of the image (for ``drop_base_iou``).
        drop_base_iou: drop boxes with IoU >= this with any base GT box (None: keep).
        drop_base_argmax: drop boxes whose most probable class is a base class.
    """
    if boxes.shape[0] != probs.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {probs.shape[0]} probability rows")
    if base_classes.shape != (probs.shape[1],):
        raise ValueError(f"base_classes must be [{probs.shape[1]}], got {tuple(base_classes.shape)}")
    score, confidence, argmax = proposal_scores(probs)
    boxes = boxes.float()
    keep = nms(boxes, score, nms_thresh)
    if drop_base_iou is not None and base_gt_boxes is not None and base_gt_boxes.numel():
        overlap = box_iou(boxes[keep], base_gt_boxes.float()).max(dim=1).values
        keep = keep[overlap < drop_base_iou]
    if drop_base_argmax:
        keep = keep[~base_classes[argmax[keep]]]
    keep = keep[:per_image]  # nms returns indices sorted by decreasing score
    return Proposals(
        boxes[keep].numpy(), score[keep].numpy(), {CONFIDENCE: confidence[keep].numpy()}
    )


class ClipProposalSource:
    """Dense anchors scored by the teacher over every class name (see the module docstring).

    The teacher and its text bank are loaded on first use in the process that proposes
    (a Ray actor), or taken from ``teacher`` when given; pickling drops them.
    """

    name = "clip"
    extra_names: tuple[str, ...] = (CONFIDENCE,)
    needs_accelerator = True

    def __init__(
        self,
        teacher_cfg: "TeacherConfig",
        work_dir: str | Path,
        class_names: Sequence[str],
        base_classes: Sequence[bool],
        base_category_ids: Sequence[int],
        *,
        crop: str,
        anchor_stride: int,
        anchor_sizes: Sequence[int],
        anchor_ratios: Sequence[float],
        nms_thresh: float,
        per_image: int,
        drop_base_iou: float | None,
        drop_base_argmax: bool,
        device: str = "cpu",
        teacher: "Teacher | None" = None,
    ) -> None:
        if len(class_names) != len(base_classes):
            raise ValueError(f"{len(class_names)} class names but {len(base_classes)} base flags")
        self.teacher_cfg = teacher_cfg
        self.work_dir = Path(work_dir)
        self.class_names = list(class_names)
        self.base_classes = torch.tensor(list(base_classes), dtype=torch.bool)
        self.base_category_ids = frozenset(int(i) for i in base_category_ids)
        self.crop = crop
        self.anchor_stride = int(anchor_stride)
        self.anchor_sizes = tuple(int(s) for s in anchor_sizes)
        self.anchor_ratios = tuple(float(r) for r in anchor_ratios)
        self.nms_thresh = float(nms_thresh)
        self.per_image = int(per_image)
        self.drop_base_iou = drop_base_iou
        self.drop_base_argmax = bool(drop_base_argmax)
        self.device = device
        self._teacher = teacher
        self._text: torch.Tensor | None = None

    @classmethod
    def from_config(
        cls, cfg: "ExperimentConfig", dataset: "OVDDataset", *, device: str = "cpu", teacher: "Teacher | None" = None
    ) -> "ClipProposalSource":
        base = set(dataset.base_ids)
        pcfg = cfg.proposals
        return cls(
            cfg.teacher,
            cfg.work_path(),
            dataset.class_names,
            [c["id"] in base for c in dataset.categories],
            dataset.base_ids,
            crop=cfg.store.crop,
            anchor_stride=pcfg.anchor_stride,
            anchor_sizes=pcfg.anchor_sizes,
            anchor_ratios=pcfg.anchor_ratios,
            nms_thresh=pcfg.nms_thresh,
            per_image=pcfg.per_image,
            drop_base_iou=pcfg.drop_base_iou,
            drop_base_argmax=pcfg.drop_base_argmax,
            device=device,
            teacher=teacher,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_teacher"] = None
        state["_text"] = None
        return state

    def fingerprint(self) -> dict[str, Any]:
        # The anchor, NMS and removal settings are in the proposals config, the teacher's
        # digest and the crop recipe in the stage key; the vocabulary is the dataset's.
        return {"class_names": self.class_names, "base_classes": self.base_classes.tolist(), "prompt": self.teacher_cfg.prompt}

    def _ready(self) -> tuple["Teacher", torch.Tensor]:
        from ovdlab.platform.teacher.loading import load_teacher
        from ovdlab.platform.teacher.prompts import cached_text_bank

        if self._teacher is None:
            self._teacher = load_teacher(self.teacher_cfg, self.work_dir, self.device)
        if self._text is None:
            bank = cached_text_bank(self._teacher, self.class_names, self.teacher_cfg.prompt, self.work_dir / "text_banks")
            self._text = bank.embeddings.float()
        return self._teacher, self._text

    def class_probs(self, image: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        """[N, C] softmax over all class names of each box's crop embedding."""
        from ovdlab.platform.teacher.regions import embed_regions

        teacher, text = self._ready()
        tensor = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        emb = embed_regions(teacher, [tensor], [torch.from_numpy(boxes)], self.crop, teacher.batch_size)[0]
        return torch.softmax(teacher.logit_scale * emb.float() @ text.T, dim=1)

    def propose(self, image: np.ndarray, image_id: int, annotations: list[dict[str, Any]]) -> Proposals:
        height, width = image.shape[:2]
        anchors = dense_anchors(height, width, self.anchor_stride, self.anchor_sizes, self.anchor_ratios)
        if not len(anchors):
            return Proposals.empty(self.extra_names)
        probs = self.class_probs(image, anchors)
        base_gt = [a["bbox"] for a in annotations if int(a["category_id"]) in self.base_category_ids]
        base_boxes = torch.from_numpy(xywh_to_xyxy(np.asarray(base_gt, np.float32))) if base_gt else None
        return select_proposals(
            torch.from_numpy(anchors),
            probs,
            nms_thresh=self.nms_thresh,
            per_image=self.per_image,
            base_classes=self.base_classes,
            base_gt_boxes=base_boxes,
            drop_base_iou=self.drop_base_iou,
            drop_base_argmax=self.drop_base_argmax,
        )

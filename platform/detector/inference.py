"""Inference on decoded images: detections in original pixels, COCO results, proposals.

:func:`predict_images` resizes as the data path does in evaluation, runs the detector
with the given vocabulary and maps boxes back to original pixels with the exact
per-axis resize factors. The model's vocabulary, inference settings and train/eval
mode are restored afterwards, so evaluating in the middle of training (base + novel
vocabulary) cannot leak into the next training step (base vocabulary).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import boxes as box_ops
from tqdm import tqdm

from ovdlab.methods.base import Vocabulary
from ovdlab.platform.config import EvalConfig
from ovdlab.platform.detector.data import image_to_tensor
from ovdlab.platform.detector.model import OVDDetector
from ovdlab.platform.detector.transforms import resize, scale_boxes


@contextmanager
def _inference_state(model: OVDDetector, vocab: Vocabulary | None, eval_cfg: EvalConfig | None) -> Iterator[None]:
    heads = model.roi_heads
    saved = (model.text, model.is_novel, model.class_names, model.training,
             heads.score_thresh, heads.nms_thresh, heads.detections_per_image, heads.generator)
    try:
        if vocab is not None:
            model.set_vocabulary(vocab)
        if eval_cfg is not None:
            model.set_inference(eval_cfg)
        model.eval()
        with torch.no_grad():
            yield
    finally:
        (text, is_novel, model.class_names, training, heads.score_thresh, heads.nms_thresh,
         heads.detections_per_image, heads.generator) = saved
        model.register_buffer("text", text, persistent=False)
        model.register_buffer("is_novel", is_novel, persistent=False)
        model.train(training)


def _device(model: OVDDetector) -> torch.device:
    return model.pixel_mean.device


def _prepare(images: Sequence[np.ndarray], min_size: int, max_size: int) -> tuple[list[Tensor], list[tuple[float, float]]]:
    tensors, scales = [], []
    for image in images:
        resized, _, scale = resize(image_to_tensor(image), {}, min_size, max_size)
        tensors.append(resized)
        scales.append(scale)
    return tensors, scales


def _to_original(boxes: Tensor, scale: tuple[float, float], size: tuple[int, int]) -> Tensor:
    return box_ops.clip_boxes_to_image(scale_boxes(boxes, 1.0 / scale[0], 1.0 / scale[1]), size)


def predict_images(
    model: OVDDetector,
    images: Sequence[np.ndarray],
    vocab: Vocabulary,
    eval_cfg: EvalConfig,
    min_size: int,
    max_size: int,
) -> list[dict[str, Tensor]]:
    """Detect in ``H x W x 3`` uint8 images against ``vocab``.

    Returns per image (on CPU) ``boxes`` xyxy in original pixels, ``scores``, ``labels``
    (0-based vocabulary index) and ``embeddings`` when the method provides them.
    Batches of ``eval_cfg.batch_size``; score threshold, NMS and the number of
    detections per image come from ``eval_cfg``.
    """
    results: list[dict[str, Tensor]] = []
    device = _device(model)
    batch_size = eval_cfg.batch_size
    with _inference_state(model, vocab, eval_cfg):
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="detect", unit="batch", leave=False, disable=len(starts) < 4):
            batch = images[start : start + batch_size]
            tensors, scales = _prepare(batch, min_size, max_size)
            detections = model([t.to(device) for t in tensors])
            for det, scale, image in zip(detections, scales, batch):
                out = {k: v.cpu() for k, v in det.items()}
                out["boxes"] = _to_original(out["boxes"], scale, image.shape[:2])
                results.append(out)
    return results


def region_outputs(
    model: OVDDetector, image: np.ndarray, boxes: Tensor, min_size: int, max_size: int
) -> dict[str, Tensor]:
    """The method head's outputs (e.g. ``embedding``) for given ``boxes`` (xyxy, original
    pixels) of one ``H x W x 3`` uint8 image: the box head run on those boxes instead of
    proposals, resized as in evaluation. Rows follow ``boxes``; on CPU."""
    device = _device(model)
    with _inference_state(model, None, None):
        tensors, scales = _prepare([image], min_size, max_size)
        images = model.preprocess([tensors[0].to(device)])
        features = model.backbone(images.tensors)
        scaled = scale_boxes(boxes.float().to(device), scales[0][0], scales[0][1])
        heads = model.roi_heads
        rep = heads.box_head(heads.box_pool(features, [scaled], images.image_sizes))
        return {k: v.float().cpu() for k, v in heads.method.forward_head(heads.method_head, rep).items()}


def propose_images(
    model: OVDDetector, images: Sequence[np.ndarray], min_size: int, max_size: int, batch_size: int = 8
) -> list[tuple[Tensor, Tensor]]:
    """The RPN's class-agnostic proposals (boxes in original pixels, objectness), on CPU."""
    results: list[tuple[Tensor, Tensor]] = []
    device = _device(model)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="propose", unit="batch", leave=False, disable=len(starts) < 4):
        batch = images[start : start + batch_size]
        tensors, scales = _prepare(batch, min_size, max_size)
        proposals = model.proposals_only([t.to(device) for t in tensors])
        for (boxes, scores), scale, image in zip(proposals, scales, batch):
            results.append((_to_original(boxes.cpu(), scale, image.shape[:2]), scores.cpu()))
    return results


def detections_to_coco(
    detections: Sequence[dict[str, Tensor]], image_ids: Sequence[int], category_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO results: one dict per detection (image_id, category_id, bbox xywh, score).

    ``category_ids[k]`` is the dataset category id of vocabulary index ``k``.
    """
    if len(detections) != len(image_ids):
        raise ValueError(f"{len(detections)} detection sets but {len(image_ids)} image ids")
    results = []
    for det, image_id in zip(detections, image_ids):
        boxes = det["boxes"].detach().cpu().double()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for bbox, score, label in zip(xywh, det["scores"].tolist(), det["labels"].tolist()):
            if not 0 <= label < len(category_ids):
                raise ValueError(f"image {image_id}: label {label} outside the vocabulary of {len(category_ids)}")
            results.append(
                {"image_id": int(image_id), "category_id": int(category_ids[label]), "bbox": bbox, "score": float(score)}
            )
    return results

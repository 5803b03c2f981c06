"""Open-vocabulary RoI heads: torchvision's Fast R-CNN machinery around a method head.

Sampling, matching and box coding are torchvision's (``RoIHeads``): proposals plus
ground truth, IoU >= 0.5 foreground, < 0.5 background, ``batch_size_per_image`` RoIs
with a 25 % foreground fraction, box deltas with weights (10, 10, 5, 5). What differs:

- classification is the method's (:class:`~ovdlab.methods.base.Method`): box-head
  feature -> method head -> logits against the frozen text bank;
- box regression is class-agnostic (``Linear(representation, 4)``), as in ViLD, so
  it transfers to classes never seen in training, unless the method brings its own box
  branch with per-class deltas (``Method.build_box_head`` / ``box_deltas``: EZSD's
  text-conditioned regression; the ground-truth class's deltas are regressed and each
  class's are decoded); its loss is torchvision's
  ``fastrcnn_loss`` (smooth L1, beta 1/9, summed over foreground RoIs and divided by
  the number of sampled RoIs) on the single class-agnostic box;
- distillation boxes (per image, in the resized image's coordinates) are pooled with
  the sampled RoIs through the same RoI pooling, box head and method head, then handed
  to the method's loss, with no class or box loss of their own (ViLD, Sec. 3.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import RoIAlign
from torchvision.ops import boxes as box_ops

from ovdlab.methods.base import DistillOutputs, Method, RegionContext, Vocabulary
from ovdlab.platform.detector.backbone import C4_POOL_SIZE, C4_STRIDE


class C4RoIPool(nn.Module):
    """detectron2 C4 pooler: ROIAlignV2 (``aligned=True``), 14x14 on the stride-16 map."""

    def __init__(self) -> None:
        super().__init__()
        self.align = RoIAlign(C4_POOL_SIZE, spatial_scale=1.0 / C4_STRIDE, sampling_ratio=0, aligned=True)

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        return self.align(features["0"], boxes)


def _split_rows(outputs: dict[str, Tensor], mask: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split every row-aligned head output into (rows where ``~mask``, rows where ``mask``)."""
    return {k: v[~mask] for k, v in outputs.items()}, {k: v[mask] for k, v in outputs.items()}


class OVDRoIHeads(nn.Module):
    """Fast R-CNN stage with a pluggable open-vocabulary classifier (see module doc)."""

    def __init__(
        self,
        box_pool: nn.Module,
        box_head: nn.Module,
        representation: int,
        method: Method,
        embed_dim: int,
        batch_size_per_image: int,
        classes: Vocabulary | None = None,
        positive_fraction: float = 0.25,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        score_thresh: float = 0.001,
        nms_thresh: float = 0.5,
        detections_per_image: int = 100,
    ) -> None:
        super().__init__()
        self.box_pool = box_pool
        self.box_head = box_head
        self.method = method
        self.method_head = method.build_head(representation, embed_dim, classes)
        custom_box_head = method.build_box_head(representation, embed_dim)
        self.per_class_boxes = custom_box_head is not None
        if custom_box_head is None:
            custom_box_head = nn.Linear(representation, 4)
            nn.init.normal_(custom_box_head.weight, std=0.001)
            nn.init.zeros_(custom_box_head.bias)
        self.box_predictor = custom_box_head
        self.proposal_matcher = det_utils.Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_coder = det_utils.BoxCoder(bbox_reg_weights)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.generator: torch.Generator | None = None

    # ------------------------------------------------------------------ training
    def select_training_samples(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """torchvision ``RoIHeads.select_training_samples``: add GT, match, sample.

        Returns the sampled RoIs per image, their labels (0 = background) and box
        regression targets, both concatenated over the batch.
        """
        sampled_rois, all_labels, all_targets = [], [], []
        for props, target in zip(proposals, targets):
            gt_boxes = target["boxes"].to(props.dtype)
            gt_labels = target["labels"].to(torch.int64)
            props = torch.cat([props, gt_boxes])
            if gt_boxes.numel() == 0:
                matched = torch.zeros(len(props), dtype=torch.int64, device=props.device)
                labels = torch.zeros(len(props), dtype=torch.int64, device=props.device)
                gt_boxes = torch.zeros((1, 4), dtype=props.dtype, device=props.device)
            else:
                match = self.proposal_matcher(box_ops.box_iou(gt_boxes, props))
                matched = match.clamp(min=0)
                labels = gt_labels[matched]
                labels[match == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0
                labels[match == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1
            pos, neg = self.fg_bg_sampler([labels])
            keep = torch.where(pos[0] | neg[0])[0]
            sampled_rois.append(props[keep])
            all_labels.append(labels[keep])
            all_targets.append(self.box_coder.encode_single(gt_boxes[matched[keep]], props[keep]))
        return sampled_rois, torch.cat(all_labels), torch.cat(all_targets)

    def box_deltas(self, rep: Tensor, head_out: dict[str, Tensor], vocab: Vocabulary) -> Tensor:
        """``[R, 4]`` class-agnostic deltas, or ``[R, C, 4]`` from the method's box branch."""
        if self.per_class_boxes:
            return self.method.box_deltas(self.box_predictor, rep, head_out, vocab)
        return self.box_predictor(rep)

    @staticmethod
    def deltas_of_labels(deltas: Tensor, labels: Tensor) -> Tensor:
        """Each RoI's deltas for its ground-truth class (``[R, C, 4]`` -> ``[R, 4]``;
        background rows take class 0's, which the box loss ignores)."""
        if deltas.ndim == 2:
            return deltas
        return deltas[torch.arange(len(labels), device=deltas.device), (labels - 1).clamp(min=0)]

    def box_loss(self, deltas: Tensor, labels: Tensor, regression_targets: Tensor) -> Tensor:
        """Class-agnostic ``fastrcnn_loss`` box term: smooth L1 on foreground / #sampled."""
        pos = torch.where(labels > 0)[0]
        loss = F.smooth_l1_loss(deltas[pos].float(), regression_targets[pos], beta=1 / 9, reduction="sum")
        return loss / max(labels.numel(), 1)

    def _distill_inputs(
        self, targets: list[dict[str, Tensor]], embed_dim: int, device: torch.device
    ) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        boxes, embeddings, weights, index = [], [], [], []
        for i, target in enumerate(targets):
            b = target.get("distill_boxes")
            if b is None:
                b = torch.zeros((0, 4), device=device)
                e = torch.zeros((0, embed_dim), device=device)
            else:
                if "distill_embeddings" not in target:
                    raise ValueError(f"target {i} has distill_boxes but no distill_embeddings")
                e = target["distill_embeddings"]
                if e.shape != (len(b), embed_dim):
                    raise ValueError(
                        f"target {i}: distill_embeddings shape {tuple(e.shape)} does not match "
                        f"{len(b)} distill_boxes and the text bank's dimension {embed_dim}"
                    )
            w = target.get("distill_weights")
            boxes.append(b.float())
            embeddings.append(e.float())
            weights.append(torch.ones(len(b), device=device) if w is None else w.float())
            index.append(torch.full((len(b),), i, dtype=torch.int64, device=device))
        return boxes, torch.cat(embeddings), torch.cat(weights), torch.cat(index)

    def forward_train(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        vocab: Vocabulary,
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        rois, labels, regression_targets = self.select_training_samples(proposals, targets)
        distill = self.method.distills
        device = vocab.embeddings.device
        if distill:
            d_boxes, d_targets, d_weights, d_index = self._distill_inputs(targets, vocab.embeddings.shape[1], device)
            rois = [torch.cat([r, d]) for r, d in zip(rois, d_boxes)]
            is_distill = torch.cat(
                [torch.arange(len(r), device=device) >= len(r) - len(d) for r, d in zip(rois, d_boxes)]
            )
        rep = self.box_head(self.box_pool(features, rois, image_sizes))
        head_out = self.method.forward_head(self.method_head, rep)
        distill_out = None
        if distill:
            head_out, distill_head_out = _split_rows(head_out, is_distill)
            distill_out = DistillOutputs(distill_head_out, d_targets, d_weights, d_index)
            rep = rep[~is_distill]
        losses = self.method.losses(self.method_head, head_out, labels, vocab, distill_out)
        deltas = self.deltas_of_labels(self.box_deltas(rep, head_out, vocab), labels)
        losses["loss_box"] = self.box_loss(deltas, labels, regression_targets)
        return losses

    # ----------------------------------------------------------------- inference
    def forward_eval(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        vocab: Vocabulary,
        objectness: list[Tensor] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Class-agnostic decode, method scores (given the proposals' ``objectness`` per
        image, when known), threshold, per-class NMS, top-k."""
        rep = self.box_head(self.box_pool(features, proposals, image_sizes))
        head_out = self.method.forward_head(self.method_head, rep)
        regions = RegionContext(torch.cat(objectness).float() if objectness is not None else None, self.generator)
        scores = self.method.scores(self.method_head, head_out, vocab, regions).float()
        deltas = self.box_deltas(rep, head_out, vocab).float()
        boxes = self.box_coder.decode(deltas.reshape(len(deltas), -1), proposals).reshape(len(deltas), -1, 4)
        embedding = head_out.get("embedding")
        counts = [len(p) for p in proposals]
        results = []
        start = 0
        for count, size in zip(counts, image_sizes):
            rows = slice(start, start + count)
            start += count
            emb = embedding[rows] if embedding is not None else None
            results.append(self.postprocess(boxes[rows], scores[rows], size, emb))
        return results

    def postprocess(
        self, boxes: Tensor, scores: Tensor, image_size: tuple[int, int], embedding: Tensor | None
    ) -> dict[str, Tensor]:
        """torchvision ``postprocess_detections``; ``boxes`` ``[R, 1, 4]`` (one box shared by
        all classes) or ``[R, C, 4]`` (a box per class)."""
        num_classes = scores.shape[1]
        boxes = box_ops.clip_boxes_to_image(boxes, image_size)
        roi_index = torch.arange(len(boxes), device=boxes.device)[:, None].expand(-1, num_classes).reshape(-1)
        labels = torch.arange(num_classes, device=boxes.device)[None].expand(len(boxes), -1).reshape(-1)
        flat_scores = scores.reshape(-1)
        keep = torch.where(flat_scores > self.score_thresh)[0]
        roi_index, labels, flat_scores = roi_index[keep], labels[keep], flat_scores[keep]
        det_boxes = boxes[roi_index, labels if boxes.shape[1] > 1 else 0]
        keep = box_ops.remove_small_boxes(det_boxes, min_size=1e-2)
        det_boxes, roi_index, labels, flat_scores = det_boxes[keep], roi_index[keep], labels[keep], flat_scores[keep]
        keep = box_ops.batched_nms(det_boxes, flat_scores, labels, self.nms_thresh)[: self.detections_per_image]
        out = {"boxes": det_boxes[keep], "scores": flat_scores[keep], "labels": labels[keep]}
        if embedding is not None:
            out["embeddings"] = embedding[roi_index[keep]].float()
        return out

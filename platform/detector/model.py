"""The two-stage open-vocabulary detector every method shares.

``OVDDetector`` = normalize + pad (``ImageList``) -> ResNet backbone (FPN or C4) ->
torchvision RPN -> :class:`~ovdlab.platform.detector.roi_heads.OVDRoIHeads`, whose
classifier is the method's head scored against a frozen text bank.

Unlike torchvision's ``GeneralizedRCNNTransform``, the model does not resize: the data
path resizes (and flips) images together with their ground-truth and distillation
boxes (``transforms.py``), so targets arrive in the coordinates of the image given.
The vocabulary (text embeddings and which classes are novel) is a pair of
non-persistent buffers, swapped with :meth:`OVDDetector.set_vocabulary` (base classes
for training, base + novel for evaluation, any list for prediction); it never trains
and never enters a checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers

from ovdlab.methods.base import Method, Vocabulary
from ovdlab.platform.config import EvalConfig, ModelConfig
from ovdlab.platform.detector.backbone import Backbone, build_backbone
from ovdlab.platform.detector.roi_align import GatherMultiScaleRoIAlign
from ovdlab.platform.detector.roi_heads import C4RoIPool, OVDRoIHeads

# ImageNet statistics of torchvision's ResNets (images in 0..1).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
SIZE_DIVISIBLE = 32


class OVDRPN(RegionProposalNetwork):
    """torchvision's RPN that also returns the objectness of the proposals it keeps."""

    def propose(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        """``RegionProposalNetwork.forward`` returning (boxes, objectness probs, losses)."""
        maps = list(features.values())
        objectness, deltas = self.head(maps)
        anchors = self.anchor_generator(images, maps)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, scores = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("the RPN needs targets in training mode")
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_box = self.compute_loss(objectness, deltas, labels, regression_targets)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}
        return boxes, scores, losses

    def forward(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """torchvision's contract: (boxes, losses)."""
        boxes, _, losses = self.propose(images, features, targets)
        return boxes, losses


class OVDDetector(nn.Module):
    """Faster R-CNN with an open-vocabulary, method-defined classifier (see module doc)."""

    def __init__(self, backbone: Backbone, rpn: OVDRPN, roi_heads: OVDRoIHeads, embed_dim: int) -> None:
        super().__init__()
        self.backbone = backbone.body
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.embed_dim = embed_dim
        self.register_buffer("pixel_mean", torch.tensor(IMAGE_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGE_STD).view(3, 1, 1), persistent=False)
        self.register_buffer("text", torch.zeros(0, embed_dim), persistent=False)
        self.register_buffer("is_novel", torch.zeros(0, dtype=torch.bool), persistent=False)
        self.class_names: tuple[str, ...] = ()

    @property
    def method(self) -> Method:
        return self.roi_heads.method

    @property
    def num_classes(self) -> int:
        return int(self.text.shape[0])

    def set_vocabulary(self, vocab: Vocabulary) -> None:
        """Install ``vocab`` (row k = vocabulary index k): its frozen text embeddings and
        novel mask become non-persistent buffers, so they follow the model across devices
        but never enter a checkpoint."""
        if vocab.embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"text bank must be [C > 0, {self.embed_dim}], got {tuple(vocab.embeddings.shape)}")
        vocab = vocab.to(self.pixel_mean.device)
        self.register_buffer("text", vocab.embeddings, persistent=False)
        self.register_buffer("is_novel", vocab.is_novel, persistent=False)
        self.class_names = vocab.names

    @property
    def vocabulary(self) -> Vocabulary:
        """The installed vocabulary (what the method scores against)."""
        if self.num_classes == 0:
            raise RuntimeError("no vocabulary: call set_vocabulary(...) before running the detector")
        return Vocabulary(self.text, self.is_novel, self.class_names)

    def set_inference(self, eval_cfg: EvalConfig) -> None:
        """Score threshold, NMS IoU and detections per image used by :meth:`forward` in eval,
        and a generator freshly seeded with ``eval.seed`` for methods that sample."""
        self.roi_heads.score_thresh = eval_cfg.score_thresh
        self.roi_heads.nms_thresh = eval_cfg.nms_thresh
        self.roi_heads.detections_per_image = eval_cfg.detections_per_image
        self.roi_heads.generator = torch.Generator(device=self.pixel_mean.device).manual_seed(eval_cfg.seed)

    def preprocess(self, images: list[Tensor]) -> ImageList:
        """Normalize with ImageNet statistics and zero-pad to a multiple of 32."""
        if not images:
            raise ValueError("no images given")
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
                raise ValueError(f"image {i}: expected a float tensor [3, H, W], got {image.dtype} {tuple(image.shape)}")
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        pad_h = -(-max(h for h, _ in sizes) // SIZE_DIVISIBLE) * SIZE_DIVISIBLE
        pad_w = -(-max(w for _, w in sizes) // SIZE_DIVISIBLE) * SIZE_DIVISIBLE
        batch = torch.stack(
            [
                F.pad((im.to(self.pixel_mean) - self.pixel_mean) / self.pixel_std, (0, pad_w - w, 0, pad_h - h))
                for im, (h, w) in zip(images, sizes)
            ]
        )
        return ImageList(batch, sizes)

    def _check_targets(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> None:
        if len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        for i, target in enumerate(targets):
            name = f"image {target.get('image_id', i)}"
            boxes, labels = target.get("boxes"), target.get("labels")
            if boxes is None or labels is None:
                raise ValueError(f"{name}: target needs 'boxes' and 'labels'")
            if boxes.ndim != 2 or boxes.shape[1] != 4 or len(labels) != len(boxes):
                raise ValueError(f"{name}: boxes {tuple(boxes.shape)} / labels {tuple(labels.shape)} malformed")
            if len(boxes):
                if not torch.isfinite(boxes).all() or (boxes[:, 2:] <= boxes[:, :2]).any():
                    raise ValueError(f"{name}: boxes must be finite with x2 > x1 and y2 > y1")
                if labels.min() < 1 or labels.max() > self.num_classes:
                    raise ValueError(
                        f"{name}: labels must lie in 1..{self.num_classes} (the vocabulary), "
                        f"got {int(labels.min())}..{int(labels.max())}"
                    )
            distill = target.get("distill_boxes")
            if distill is not None and (distill.ndim != 2 or distill.shape[1] != 4 or not torch.isfinite(distill).all()):
                raise ValueError(f"{name}: distill_boxes must be finite [M, 4], got {tuple(distill.shape)}")

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: loss dict (RPN, method classification + extras, box). Eval: detections.

        Images are float ``[3, H, W]`` in 0..1, already resized; eval detections are per
        image ``boxes`` (in those coordinates), ``scores``, ``labels`` (0-based vocabulary
        index) and ``embeddings`` when the method head outputs an ``embedding``.
        """
        vocab = self.vocabulary
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets")
            self._check_targets(images, targets)
        image_list = self.preprocess(images)
        features = self.backbone(image_list.tensors)
        proposals, objectness, rpn_losses = self.rpn.propose(image_list, features, targets if self.training else None)
        if self.training:
            roi_losses = self.roi_heads.forward_train(features, proposals, image_list.image_sizes, vocab, targets)
            return {**rpn_losses, **roi_losses}
        return self.roi_heads.forward_eval(features, proposals, image_list.image_sizes, vocab, objectness)

    @torch.no_grad()
    def proposals_only(self, images: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """The RPN's top ``rpn_post_nms_top_n`` class-agnostic boxes and objectness per image.

        Runs in eval mode (test-time RPN settings) and restores the previous mode; boxes
        are in the coordinates of the given (already resized) images.
        """
        was_training = self.training
        self.eval()
        try:
            image_list = self.preprocess(images)
            features = self.backbone(image_list.tensors)
            boxes, scores, _ = self.rpn.propose(image_list, features)
        finally:
            self.train(was_training)
        return list(zip(boxes, scores))


def build_detector(
    model_cfg: ModelConfig, method: Method, embed_dim: int, classes: Vocabulary | None = None
) -> OVDDetector:
    """Backbone + RPN + OVD RoI heads from the config; ``embed_dim`` = text bank width,
    ``classes`` the evaluation vocabulary a per-class method head sizes itself by
    (:meth:`Method.build_head`)."""
    if model_cfg.embed_dim is not None and model_cfg.embed_dim != embed_dim:
        raise ValueError(
            f"model.embed_dim={model_cfg.embed_dim} differs from the text bank's dimension {embed_dim}; "
            "region embeddings are compared with text embeddings, so they must agree"
        )
    backbone = build_backbone(model_cfg)
    ratios = tuple(model_cfg.anchor_ratios)
    if model_cfg.neck == "fpn":
        sizes = tuple((size,) for size in model_cfg.anchor_sizes)
        anchors = AnchorGenerator(sizes, (ratios,) * len(sizes))
        box_pool: nn.Module = GatherMultiScaleRoIAlign(backbone.feature_names, output_size=7, sampling_ratio=2)
        box_head: nn.Module = TwoMLPHead(backbone.out_channels * 7 * 7, model_cfg.representation_size)
        representation = model_cfg.representation_size
    else:
        anchors = AnchorGenerator((tuple(model_cfg.anchor_sizes),), (ratios,))
        box_pool = C4RoIPool()
        box_head = backbone.box_head
        representation = backbone.box_head.out_channels
    rpn = OVDRPN(
        anchors,
        RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=model_cfg.rpn_batch_size_per_image,
        positive_fraction=0.5,
        pre_nms_top_n={"training": model_cfg.rpn_pre_nms_top_n, "testing": model_cfg.rpn_pre_nms_top_n},
        post_nms_top_n={"training": model_cfg.rpn_post_nms_top_n, "testing": model_cfg.rpn_post_nms_top_n},
        nms_thresh=0.7,
    )
    eval_defaults = EvalConfig()
    roi_heads = OVDRoIHeads(
        box_pool,
        box_head,
        representation,
        method,
        embed_dim,
        batch_size_per_image=model_cfg.roi_batch_size_per_image,
        classes=classes,
        score_thresh=eval_defaults.score_thresh,
        nms_thresh=eval_defaults.nms_thresh,
        detections_per_image=eval_defaults.detections_per_image,
    )
    return OVDDetector(backbone, rpn, roi_heads, embed_dim)

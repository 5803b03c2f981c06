"""EZSD (methods/ezsd.py): weighted distillation against hand-computed values, the learnable
temperature, text-conditioned regression through the detector, the store it declares
(CLIP proposals filtered against base ground truth, plus the ground truth) and its recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ovdlab.methods.base import DistillOutputs, Vocabulary
from ovdlab.methods.ezsd import EZSD, TextConditionedBoxHead, per_image_mean_one
from ovdlab.methods.registry import build_method
from ovdlab.platform.config import EvalConfig, EZSDConfig, ModelConfig, load_config
from ovdlab.platform.detector import build_detector
from ovdlab.platform.proposals.clip_proposals import ClipProposalSource
from ovdlab.platform.proposals.ground_truth import WithGroundTruth

CFG = ModelConfig(backbone="resnet18", fpn_channels=16, representation_size=32, min_size=64, max_size=64,
                  rpn_pre_nms_top_n=60, rpn_post_nms_top_n=20, rpn_batch_size_per_image=32, roi_batch_size_per_image=16)


def _distill(embeddings: torch.Tensor, targets: torch.Tensor, weights: list[float], images: list[int]) -> DistillOutputs:
    return DistillOutputs({"embedding": embeddings}, targets, torch.tensor(weights), torch.tensor(images))


def test_weights_are_renormalized_to_mean_one_within_each_image():
    weights = per_image_mean_one(torch.tensor([1.0, 1.0, 0.4, 2.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 1, 2, 2]))
    assert weights.tolist() == pytest.approx([1.25, 1.25, 0.5, 1.0, 0.0, 0.0])


def test_weighted_distillation_on_a_hand_computed_case():
    """Three regions in two images, D = 2, unit vectors: per-region L1 1.2, 0.8, 0.8;
    image 0's weights (1, 0.5) renormalize to (4/3, 2/3), image 1's 0.2 to 1; the loss is
    D x the element mean of w |e - v| = (4/3 x 1.2 + 2/3 x 0.8 + 1 x 0.8) / 3 = 0.97778."""
    region = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    loss = EZSD.distill_loss({"embedding": region}, _distill(region, target, [1.0, 0.5, 0.2], [0, 0, 1]))
    assert float(loss) == pytest.approx((4 / 3 * 1.2 + 2 / 3 * 0.8 + 0.8) / 3, rel=1e-6)
    doubled = EZSD.distill_loss({"embedding": region}, _distill(region, 2 * target, [1.0, 0.5, 0.2], [0, 0, 1]))
    assert float(doubled) == pytest.approx(float(loss), rel=1e-6)  # teacher embeddings are re-normalized


def test_distillation_is_clip_dim_times_the_element_mean_times_the_factor():
    """At D = 512 (ViT-B/32): the reference's ``L1Loss(mean) * 512 * distill_loss_factor``."""
    torch.manual_seed(0)
    region, target = F.normalize(torch.randn(5, 512), dim=1), F.normalize(torch.randn(5, 512), dim=1)
    conf = [0.9, 0.3, 1.0, 0.5, 0.7]
    method = EZSD(EZSDConfig(temperature=0.01, distill_weight=0.5))
    head = method.build_head(16, 512)
    out = {"embedding": F.normalize(torch.randn(3, 512), dim=1)}
    losses = method.losses(head, out, torch.tensor([0, 1, 0]), Vocabulary.trained(torch.randn(2, 512)),
                           _distill(region, target, conf, [0] * 5))
    w = torch.tensor(conf) / torch.tensor(conf).mean()
    reference = (w[:, None] * (region - target).abs()).mean() * 512 * 0.5
    assert float(losses["loss_distill"]) == pytest.approx(float(reference), rel=1e-5)
    same = EZSD.distill_loss({"embedding": region}, _distill(region, target, [2.0] * 5, [0] * 5))
    assert float(same) == pytest.approx(float((region - target).abs().sum(dim=1).mean()), rel=1e-5)


def test_no_distillation_boxes_give_a_zero_in_the_graph():
    emb = F.normalize(torch.randn(3, 8), dim=1).requires_grad_()
    loss = EZSD.distill_loss({"embedding": emb}, None)
    loss.backward()
    assert loss.item() == 0.0 and emb.grad is not None


def test_learnable_temperature_starts_at_100_and_gets_a_gradient():
    torch.manual_seed(0)
    method = EZSD(EZSDConfig(temperature=0.01))
    head = method.build_head(16, 8)
    assert isinstance(head.logit_scale, nn.Parameter) and head.logit_scale.exp().item() == pytest.approx(100.0)
    vocab = Vocabulary.trained(F.normalize(torch.randn(3, 8), dim=1))
    out = method.forward_head(head, torch.randn(6, 16))
    losses = method.losses(head, out, torch.tensor([0, 1, 2, 3, 1, 0]), vocab, None)
    (losses["loss_cls"] + losses["loss_distill"]).backward()
    assert head.logit_scale.grad is not None and float(head.logit_scale.grad) != 0.0
    assert float(losses["temperature"]) == pytest.approx(0.01) and not losses["temperature"].requires_grad
    fixed = EZSD(EZSDConfig(temperature=0.01, learn_temperature=False)).build_head(16, 8)
    assert "logit_scale" not in dict(fixed.named_parameters())


def test_an_uncalibrated_temperature_is_a_clear_error_not_a_default():
    with pytest.raises(ValueError, match="calibrate"):
        EZSD(EZSDConfig()).build_head(16, 8)


def test_logits_scale_the_unnormalized_background_and_the_text_cosines():
    method = EZSD(EZSDConfig(temperature=0.01))
    head = method.build_head(4, 2)
    with torch.no_grad():
        head.background.copy_(torch.tensor([3.0, 0.0]))
    region = torch.tensor([[1.0, 0.0]])
    vocab = Vocabulary.trained(torch.tensor([[2.0, 0.0], [0.0, 5.0]]))
    logits = method.logits(head, {"embedding": region}, vocab)
    assert logits[0].tolist() == pytest.approx([300.0, 100.0, 0.0], rel=1e-5)
    assert method.scores(head, {"embedding": region}, vocab).shape == (1, 2)


def test_text_conditioned_deltas_are_one_linear_map_of_feature_and_class_text():
    torch.manual_seed(0)
    branch = TextConditionedBoxHead(6, 3)
    with torch.no_grad():
        for p in branch.parameters():
            p.normal_()
    features, text = torch.randn(4, 6), F.normalize(torch.randn(5, 3), dim=1)
    deltas = branch(features, text)
    assert deltas.shape == (4, 5, 4)
    weight = torch.cat([branch.feature.weight, branch.text.weight], dim=1)
    for r in range(4):
        for c in range(5):
            joint = weight @ torch.cat([features[r], text[c]]) + branch.feature.bias
            assert torch.allclose(deltas[r, c], joint, atol=1e-5)


def test_the_detector_regresses_with_the_box_branch_and_decodes_a_box_per_class():
    torch.manual_seed(0)
    model = build_detector(CFG, EZSD(EZSDConfig(temperature=0.01)), 8)
    assert model.roi_heads.per_class_boxes and isinstance(model.roi_heads.box_predictor, TextConditionedBoxHead)
    with torch.no_grad():
        model.roi_heads.box_predictor.text.weight.normal_(std=1.0)
    vocab = Vocabulary.trained(F.normalize(torch.randn(3, 8), dim=1))
    model.set_vocabulary(vocab)
    gen = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 64, 64, generator=gen)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([2])}]
    model.train()
    model(images, targets)["loss_box"].backward()
    assert model.roi_heads.box_predictor.text.weight.grad.abs().sum() > 0  # the class text enters regression
    model.eval()
    model.set_inference(EvalConfig(score_thresh=0.0, detections_per_image=300))
    heads = model.roi_heads
    with torch.no_grad():
        deltas = heads.box_deltas(torch.randn(2, 32), {}, vocab)
        out = model(images)[0]
    assert deltas.shape == (2, 3, 4) and not torch.allclose(deltas[:, 0], deltas[:, 1])
    assert len(out["boxes"]) > 0 and set(out["labels"].tolist()) <= {0, 1, 2}


class _StubClipSource(ClipProposalSource):
    """Class probabilities by where a box is, instead of a teacher: boxes over the left
    object (x < 32) look like base class 0; elsewhere like novel class 1, more confidently
    the larger the box."""

    def class_probs(self, image: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        centre = (boxes[:, 0] + boxes[:, 2]) / 2
        novel_conf = 0.55 + 0.4 * (boxes[:, 2] - boxes[:, 0]) / 64
        probs = np.where((centre < 32)[:, None], [[0.8, 0.2]], np.stack([1 - novel_conf, novel_conf], axis=1))
        return torch.tensor(probs, dtype=torch.float32)


def test_the_store_holds_filtered_clip_proposals_after_the_ground_truth(tmp_path):
    """A 64 x 64 image with a base box on the left: proposals overlapping it (IoU >= 0.3) and
    proposals whose argmax is a base class are gone; the ground truth comes first with
    score and confidence 1; the fingerprint tells the two stores apart."""
    cfg = load_config("experiments/ezsd_shapes", [f"work_dir={tmp_path}"])
    inner = _StubClipSource(cfg.teacher, tmp_path, ["red square", "blue star"], [True, False], [1], crop="1.2x-square",
                            anchor_stride=16, anchor_sizes=[16, 32], anchor_ratios=[1.0], nms_thresh=0.7, per_image=50,
                            drop_base_iou=0.3, drop_base_argmax=True)
    source = WithGroundTruth(inner)
    gt = {"category_id": 1, "bbox": [2.0, 10.0, 28.0, 28.0]}
    got = source.propose(np.zeros((64, 64, 3), np.uint8), 7, [gt])
    np.testing.assert_array_equal(got.boxes[0], [2.0, 10.0, 30.0, 38.0])
    assert got.scores[0] == 1.0 and got.extras["confidence"][0] == 1.0
    rest = got.boxes[1:]
    assert len(rest) > 0 and ((rest[:, 0] + rest[:, 2]) / 2 >= 32).all()  # base-argmax boxes dropped
    plain = inner.propose(np.zeros((64, 64, 3), np.uint8), 7, [gt])
    np.testing.assert_array_equal(plain.boxes, rest)
    np.testing.assert_allclose(got.extras["confidence"][1:], plain.extras["confidence"])
    keep_base = _StubClipSource(cfg.teacher, tmp_path, ["red square", "blue star"], [True, False], [1], crop="1.2x-square",
                                anchor_stride=16, anchor_sizes=[16, 32], anchor_ratios=[1.0], nms_thresh=0.7,
                                per_image=50, drop_base_iou=0.3, drop_base_argmax=False)
    kept = keep_base.propose(np.zeros((64, 64, 3), np.uint8), 7, [gt]).boxes
    iou_to_gt = [float(_iou(b, [2.0, 10.0, 30.0, 38.0])) for b in kept]
    assert max(iou_to_gt) < 0.3 and any(((b[0] + b[2]) / 2) < 32 for b in kept)  # IoU drop alone
    assert source.fingerprint() != inner.fingerprint() and source.extra_names == ("confidence", "ground_truth")
    assert got.extras["ground_truth"].tolist() == [1.0] + [0.0] * len(rest)


def _iou(a, b) -> float:
    from torchvision.ops import box_iou

    return box_iou(torch.tensor(np.array([a]), dtype=torch.float32), torch.tensor(np.array([b]), dtype=torch.float32))[0, 0]


def test_recipe_tunes_the_teacher_then_stores_then_trains():
    cfg = load_config("experiments/ezsd_shapes")
    assert cfg.teacher.ln_tuned and cfg.proposals.source == "clip" and cfg.store.crop == "1.2x-square"
    assert cfg.proposals.drop_base_iou == 0.3 and cfg.proposals.drop_base_argmax
    stages = build_method(cfg.method).recipe(cfg)
    assert [(s.name, s.kind) for s in stages] == [("teacher", "teacher"), ("store", "extract"), ("train", "train")]
    rpn = load_config("experiments/ezsd_rpn_shapes")
    names = [(s.name, s.reads.get("proposals.checkpoint")) for s in build_method(rpn.method).recipe(rpn)]
    assert names == [("teacher", None), ("proposal-detector", None), ("store", "proposal-detector"),
                     ("train", "proposal-detector")]
    assert not load_config("experiments/ezsd_untuned_shapes").teacher.ln_tuned
    assert load_config("experiments/ezsd_lvis").method.distill_weight == 0.5
    assert load_config("experiments/ezsd_coco").method.distill_weight == 1.0


class _SpyEZSD(EZSD):
    """EZSD that records the distillation weights and images it is handed."""

    seen: list[DistillOutputs] = []

    def losses(self, head, head_out, labels, vocab, distill):
        self.seen.append(distill)
        return super().losses(head, head_out, labels, vocab, distill)


def test_the_confidence_column_reaches_the_loss_unchanged():
    """The data path's ``distill_weights`` (the store's ``confidence``) arrive in
    ``DistillOutputs.weights`` as they were, with each box's image; an image without
    weights gets 1s."""
    torch.manual_seed(0)
    method = _SpyEZSD(EZSDConfig(temperature=0.01))
    model = build_detector(CFG, method, 8)
    model.set_vocabulary(Vocabulary.trained(F.normalize(torch.randn(3, 8), dim=1)))
    model.train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    confidence = torch.tensor([1.0, 0.37, 0.81])
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([2]),
         "distill_boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0], [30.0, 30.0, 60.0, 60.0], [0.0, 0.0, 20.0, 20.0]]),
         "distill_embeddings": torch.randn(3, 8), "distill_weights": confidence},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
         "distill_boxes": torch.tensor([[8.0, 8.0, 50.0, 50.0]]), "distill_embeddings": torch.randn(1, 8)},
    ]
    model(images, targets)
    seen = method.seen[-1]
    assert torch.equal(seen.weights, torch.cat([confidence, torch.ones(1)]))
    assert seen.image_index.tolist() == [0, 0, 0, 1]

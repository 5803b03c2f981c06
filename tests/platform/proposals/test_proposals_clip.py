"""CLIP proposals (EZSD stages 2/3): anchors, score = log C - entropy, NMS, top-K, base removals."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from ovdlab.platform.config import TeacherConfig
from ovdlab.platform.proposals import ClipProposalSource, dense_anchors, proposal_scores, select_proposals


def test_scores_on_a_hand_made_distribution():
    probs = torch.tensor(
        [
            [0.25, 0.25, 0.25, 0.25],  # uniform: no information
            [1.0, 0.0, 0.0, 0.0],  # certain: log C
            [0.5, 0.5, 0.0, 0.0],  # two-way tie: log 4 - log 2
            [0.7, 0.1, 0.1, 0.1],
        ]
    )
    score, confidence, argmax = proposal_scores(probs)
    h = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))
    np.testing.assert_allclose(score.numpy(), [0.0, math.log(4), math.log(2), math.log(4) - h], atol=1e-6)
    np.testing.assert_allclose(confidence.numpy(), [0.25, 1.0, 0.5, 0.7])
    assert argmax.tolist()[1:] == [0, 0, 0]


def _scene():
    """Four boxes: 0 and 1 overlap heavily (IoU 0.9), 2 sits on a base GT box, 3 is alone."""
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9], [40, 40, 60, 60], [80, 0, 100, 30]], dtype=torch.float32)
    probs = torch.tensor(
        [
            [0.9, 0.05, 0.05],  # confident, class 0 (base)
            [0.95, 0.03, 0.02],  # more confident duplicate of box 0
            [0.1, 0.8, 0.1],  # class 1 (novel)
            [0.2, 0.2, 0.6],  # class 2 (novel), least confident
        ]
    )
    base = torch.tensor([True, False, False])
    gt = torch.tensor([[41, 41, 60, 60]], dtype=torch.float32)
    return boxes, probs, base, gt


def test_nms_keeps_the_better_of_two_overlapping_boxes():
    boxes, probs, base, _ = _scene()
    p = select_proposals(boxes, probs, nms_thresh=0.7, per_image=10, base_classes=base)
    np.testing.assert_array_equal(p.boxes, boxes[[1, 2, 3]].numpy())
    assert np.all(np.diff(p.scores) <= 0)
    np.testing.assert_allclose(p.extras["confidence"], [0.95, 0.8, 0.6], rtol=1e-6)
    loose = select_proposals(boxes, probs, nms_thresh=0.95, per_image=10, base_classes=base)
    assert len(loose) == 4


def test_top_k_after_nms():
    boxes, probs, base, _ = _scene()
    p = select_proposals(boxes, probs, nms_thresh=0.7, per_image=2, base_classes=base)
    np.testing.assert_array_equal(p.boxes, boxes[[1, 2]].numpy())


def test_base_overlap_and_base_argmax_removal():
    boxes, probs, base, gt = _scene()
    p = select_proposals(
        boxes, probs, nms_thresh=0.7, per_image=10, base_classes=base, base_gt_boxes=gt, drop_base_iou=0.3
    )
    np.testing.assert_array_equal(p.boxes, boxes[[1, 3]].numpy())  # box 2 has IoU 0.9 with the GT
    p = select_proposals(boxes, probs, nms_thresh=0.7, per_image=10, base_classes=base, drop_base_argmax=True)
    np.testing.assert_array_equal(p.boxes, boxes[[2, 3]].numpy())  # box 1's argmax is base class 0
    p = select_proposals(
        boxes, probs, nms_thresh=0.7, per_image=1, base_classes=base, base_gt_boxes=gt,
        drop_base_iou=0.3, drop_base_argmax=True,
    )
    np.testing.assert_array_equal(p.boxes, boxes[[3]].numpy())  # removals happen before top-K


def test_dense_anchor_geometry():
    anchors = dense_anchors(64, 96, stride=32, sizes=[16], ratios=[0.5, 1.0, 2.0])
    assert anchors.shape == (2 * 3 * 3, 4)
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    np.testing.assert_allclose(sorted(set(np.round(heights / widths, 4))), [0.5, 1.0, 2.0], rtol=1e-3)
    np.testing.assert_allclose(widths * heights, 256, rtol=1e-5)  # area = size^2 for every ratio
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert set(np.round(centres[:, 0]).tolist()) == {16, 48, 80}
    big = dense_anchors(64, 96, stride=32, sizes=[512], ratios=[1.0])
    np.testing.assert_array_equal(big, [[0, 0, 96, 64]])  # clipped duplicates collapse to one
    assert (big[:, 2] <= 96).all() and (big[:, 3] <= 64).all()


def test_clip_source_end_to_end_with_a_random_tiny_teacher(tmp_path):
    source = ClipProposalSource(
        TeacherConfig(model="shapes-tiny", pretrained="random", prompt="photo"),
        tmp_path,
        ["red circle", "blue square", "green star"],
        [True, False, False],
        [1],
        crop="plain",
        anchor_stride=32,
        anchor_sizes=[32, 64],
        anchor_ratios=[1.0],
        nms_thresh=0.7,
        per_image=5,
        drop_base_iou=0.3,
        drop_base_argmax=False,
    )
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    gt = [{"bbox": [0, 0, 32, 32], "category_id": 1}]
    p = source.propose(image, 1, gt)
    assert 0 < len(p) <= 5 and set(p.extras) == {"confidence"}
    assert np.all(np.diff(p.scores) <= 1e-6)
    assert (p.scores >= -1e-6).all() and (p.scores <= math.log(3) + 1e-6).all()
    assert (p.extras["confidence"] >= 1 / 3 - 1e-6).all()
    assert not any(np.allclose(b, [0, 0, 32, 32]) for b in p.boxes)  # the base GT cell is dropped
    assert list(tmp_path.joinpath("text_banks").glob("text-photo-*.pt"))  # bank cached in the work dir
    clone = pickle.loads(pickle.dumps(source))
    assert clone._teacher is None  # the model does not travel to Ray actors


def test_select_checks_shapes():
    with pytest.raises(ValueError, match="2 boxes but 1 probability rows"):
        select_proposals(torch.zeros(2, 4), torch.ones(1, 3) / 3, nms_thresh=0.5, per_image=1, base_classes=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"base_classes must be \[3\]"):
        select_proposals(torch.zeros(1, 4), torch.ones(1, 3) / 3, nms_thresh=0.5, per_image=1, base_classes=torch.zeros(2, dtype=torch.bool))

"""LP-OVOD's math against small hand-computed cases: prototype logits, focal loss, the
image-branch distillation, the score ensemble with objectness, the pseudo-labels the
retrieval writes, and the probe's frozen parts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ovdlab.methods.base import DistillOutputs, RegionContext, Vocabulary
from ovdlab.methods.lp_ovod import LPOVOD, PROBE_FROZEN, pseudo_labels_from_hits
from ovdlab.platform.config import LPOVODConfig, ModelConfig
from ovdlab.platform.detector.model import build_detector
from ovdlab.platform.store.retrieval import Retrieved
from ovdlab.platform.train.freezing import freeze

NAMES = ("red circle", "blue square", "red star")


def classes(dim: int = 2) -> Vocabulary:
    """Two known classes and one novel one, unit text embeddings along the axes."""
    return Vocabulary.against(torch.eye(3, dim), NAMES, NAMES[:2])


def method(**cfg) -> LPOVOD:
    return LPOVOD(LPOVODConfig(**cfg))


def test_prototype_logits_are_h_dot_p_with_a_zero_background_column_and_rows_by_name():
    m = method()
    head = m.build_head(2, 2, classes())
    with torch.no_grad():
        head.base_prototypes.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        head.novel_prototypes.copy_(torch.tensor([[3.0, 1.0]]))
    h = torch.tensor([[1.0, 2.0]])
    out = m.forward_head(head, h)
    logits = m.logits(head, out, classes())
    assert torch.allclose(logits, torch.tensor([[0.0, 1.0, 4.0, 5.0]]))
    # Any order, any subset; a name the run never knew scores with a zero prototype.
    reordered = Vocabulary.against(torch.eye(3, 2), ("red star", "purple cross", "red circle"), NAMES[:2])
    assert torch.allclose(m.logits(head, out, reordered), torch.tensor([[0.0, 5.0, 0.0, 1.0]]))
    # Novel prototypes start at zero (Sec. 3.3), base ones small and random.
    fresh = m.build_head(2, 2, classes())
    assert not fresh.novel_prototypes.any() and fresh.base_prototypes.abs().max() > 0


def test_focal_loss_matches_the_formula_summed_over_classes_divided_by_rois():
    m = method(focal_gamma=2.0, focal_alpha=0.25)
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    labels = torch.tensor([1, 0])  # RoI 0 is class 0 (label 1), RoI 1 background
    expected = 0.0
    for r, row in enumerate(logits.tolist()):
        for c, x in enumerate(row):
            y = 1.0 if labels[r] == c + 1 else 0.0
            p = 1 / (1 + math.exp(-x))
            ce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
            p_t = p * y + (1 - p) * (1 - y)
            alpha_t = 0.25 * y + 0.75 * (1 - y)
            expected += alpha_t * (1 - p_t) ** 2 * ce
    assert m.focal_loss(logits, labels).item() == pytest.approx(expected / 2, rel=1e-6)


def test_distillation_is_the_elementwise_mean_l1_times_the_weight_and_only_in_the_image_branch():
    m = method(distill_weight=256.0)
    head = m.build_head(2, 2, classes())
    out = m.forward_head(head, torch.randn(3, 2))
    regions = {"feature": torch.zeros(2, 2), "embedding": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    targets = torch.tensor([[0.0, 2.0], [0.0, 1.0]])  # normalized to [0, 1] twice
    distill = DistillOutputs(regions, targets, torch.ones(2), torch.zeros(2, dtype=torch.long))
    losses = m.losses(head, out, torch.tensor([0, 1, 2]), Vocabulary.trained(torch.eye(2), NAMES[:2]), distill)
    assert losses["loss_distill"].item() == pytest.approx(256.0 * (1 + 1 + 0 + 0) / 4)
    # Without boxes the term is a zero still in the graph; at weight 0 it is not computed.
    empty = DistillOutputs({k: v[:0] for k, v in regions.items()}, targets[:0], torch.ones(0), torch.zeros(0, dtype=torch.long))
    assert m.losses(head, out, torch.tensor([0, 1, 2]), Vocabulary.trained(torch.eye(2), NAMES[:2]), empty)["loss_distill"] == 0
    assert "loss_distill" not in method(distill_weight=0.0).losses(head, out, torch.tensor([0, 1, 2]),
                                                                    Vocabulary.trained(torch.eye(2), NAMES[:2]), distill)


def test_scores_sigmoid_for_base_image_text_ensemble_for_novel_and_sqrt_with_objectness():
    m = method(temperature=0.5)
    head = m.build_head(2, 2, classes())
    with torch.no_grad():
        head.base_prototypes.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        head.novel_prototypes.copy_(torch.tensor([[1.0, 1.0]]))
    out = {"feature": torch.tensor([[1.0, -1.0]]), "embedding": torch.tensor([[1.0, 0.0]])}
    vocab = Vocabulary.against(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), NAMES, NAMES[:2])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    cos = [1.0, 0.0, 1 / math.sqrt(2)]
    s_img = np.exp(np.array(cos) / 0.5) / np.exp(np.array(cos) / 0.5).sum()
    expected = [sig(1.0), sig(-1.0), s_img[2] ** 0.2 * sig(0.0) ** 0.8]
    scores = m.scores(head, out, vocab)
    assert scores[0].tolist() == pytest.approx(expected, rel=1e-5)
    with_objectness = m.scores(head, out, vocab, RegionContext(torch.tensor([0.25])))
    assert with_objectness[0].tolist() == pytest.approx([math.sqrt(0.25 * e) for e in expected], rel=1e-5)


def test_pseudo_labels_are_coco_boxes_in_original_pixels_per_class():
    hits = [
        [Retrieved(7, np.array([10.0, 20.0, 30.0, 60.0]), 0.9, 0.8), Retrieved(8, np.array([5.0, 5.0, 5.0, 9.0]), 0.7, 0.6)],
        [Retrieved(7, np.array([0.0, 0.0, 4.0, 2.0]), 0.65, 0.5)],
    ]
    labels = pseudo_labels_from_hits([(3, "red star"), (4, "blue star")], hits, {"k": 2})
    assert labels.categories == {3: "red star", 4: "blue star"}
    assert sorted(labels.by_image) == [7]  # image 8's box is empty (x2 == x1): dropped
    assert labels.by_image[7] == [
        {"image_id": 7, "category_id": 3, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.9, "similarity": 0.8},
        {"image_id": 7, "category_id": 4, "bbox": [0.0, 0.0, 4.0, 2.0], "score": 0.65, "similarity": 0.5},
    ]
    assert labels.source == {"k": 2, "per_class": {"red star": 1, "blue star": 1}}


def test_the_probe_trains_only_the_novel_prototypes():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", fpn_channels=16, representation_size=32, min_size=64, max_size=64)
    model = build_detector(cfg, method(), 2, classes())
    freeze(model, list(PROBE_FROZEN))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["roi_heads.method_head.novel_prototypes"]


def test_the_recipe_retrieves_on_the_base_stage_proposals_then_probes_from_its_weights():
    from ovdlab.platform.config import load_config

    cfg = load_config("experiments/lp_ovod_shapes")
    stages = LPOVOD(cfg.method).recipe(cfg)
    assert [(s.name, s.kind) for s in stages] == [
        ("proposal-detector", "train"), ("store", "extract"), ("base", "train"), ("retrieval", "post"), ("probe", "train")]
    assert stages[0].experiment == "experiments/vild_text_shapes"
    probe = stages[-1]
    assert probe.reads == {"proposals.checkpoint": "proposal-detector", "train.init_from": "base",
                           "train.pseudo_labels": "retrieval"}
    assert "train.lr=0.001" in probe.overrides and "method.distill_weight=0" in probe.overrides
    named = load_config("experiments/lp_ovod_shapes", ["proposals.source=gt"])
    assert [s.name for s in LPOVOD(named.method).recipe(named)] == ["store", "base", "retrieval", "probe"]

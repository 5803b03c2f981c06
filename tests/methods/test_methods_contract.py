"""The method seam: every registered method through build, forward, losses, scores and its
recipe; the Vocabulary that reaches it (embeddings and which classes were never trained on)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovdlab.methods.base import DistillOutputs, RegionContext, Vocabulary
from ovdlab.methods.registry import available_methods, build_method
from ovdlab.platform.config import calibrate, load_config
from ovdlab.platform.recipes.stages import check_recipe

IN_FEATURES, EMBED, CLASSES, ROIS, REGIONS = 12, 8, 5, 7, 4


@pytest.mark.parametrize("name", available_methods())
def test_every_method_builds_trains_and_scores(name):
    """Build (sized by the evaluation classes), forward, losses with distillation, backward,
    logits, then scores against a grown vocabulary with and without the proposals'
    objectness: one column per class, probabilities in [0, 1]."""
    torch.manual_seed(0)
    overrides = [f"method.name={name}"]
    if "distill_weight" in type(load_config(None, overrides).method).model_fields:
        overrides.append("method.distill_weight=0.5")
    method = build_method(calibrate(load_config(None, overrides), 100.0).method)
    names = [f"c{i}" for i in range(CLASSES + 3)]
    grown = Vocabulary.against(F.normalize(torch.randn(CLASSES + 3, EMBED), dim=1), names, names[:CLASSES])
    head = method.build_head(IN_FEATURES, EMBED, grown)
    vocab = Vocabulary.trained(F.normalize(torch.randn(CLASSES, EMBED), dim=1), names[:CLASSES])
    out = method.forward_head(head, torch.randn(ROIS, IN_FEATURES))
    assert all(v.shape[0] == ROIS for v in out.values())
    distill = None
    if method.distills:
        regions = method.forward_head(head, torch.randn(REGIONS, IN_FEATURES))
        distill = DistillOutputs(regions, torch.randn(REGIONS, EMBED), torch.ones(REGIONS), torch.zeros(REGIONS, dtype=torch.long))
    labels = torch.randint(0, CLASSES + 1, (ROIS,))
    losses = method.losses(head, out, labels, vocab, distill)
    assert losses and all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert method.logits(head, out, vocab).shape == (ROIS, 1 + CLASSES)
    with torch.no_grad():
        test_out = method.forward_head(head, torch.randn(ROIS, IN_FEATURES))
        for regions in (None, RegionContext(torch.rand(ROIS))):
            scores = method.scores(head, test_out, grown, regions)
            assert scores.shape == (ROIS, CLASSES + 3) and (scores >= 0).all() and (scores <= 1).all()


@pytest.mark.parametrize("name", available_methods())
def test_every_method_declares_a_runnable_recipe(name):
    experiment = f"experiments/{name.replace('-', '_')}_shapes"
    cfg = load_config(experiment)
    stages = build_method(cfg.method).recipe(cfg)
    check_recipe(stages)
    assert stages[-1].kind in ("train", "eval")


def test_vocabulary_marks_classes_never_trained_on():
    emb = torch.randn(3, 4)
    vocab = Vocabulary.against(emb, ["red circle", "blue star", "red square"], ["red circle", "red square"])
    assert vocab.is_novel.tolist() == [False, True, False] and vocab.size == 3 and vocab.names[1] == "blue star"
    assert not Vocabulary.trained(emb).is_novel.any()
    with pytest.raises(ValueError, match="bool tensor"):
        Vocabulary(emb, torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[C > 0, D\]"):
        Vocabulary.trained(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="2 names for 3"):
        Vocabulary(emb, torch.zeros(3, dtype=torch.bool), ("a", "b"))

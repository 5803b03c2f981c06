"""ViLD-text / ViLD: logit formula, temperature, background column, L1 distillation, registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ovdlab.methods.base import DistillOutputs, Method, Vocabulary
from ovdlab.methods.registry import available_methods, build_method
from ovdlab.methods.vild import ViLD, ViLDEnsemble, ViLDText
from ovdlab.platform.config import ViLDConfig


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def hand_made_head(method: Method) -> torch.nn.Module:
    """A 2 -> 2 head with identity projection and background along -y."""
    head = method.build_head(2, 2)
    with torch.no_grad():
        head.projection.weight.copy_(torch.eye(2))
        head.projection.bias.zero_()
        head.background.copy_(torch.tensor([0.0, -3.0]))
    return head


def test_logits_are_cosines_over_temperature_with_background_first():
    method = ViLDText(ViLDConfig(name="vild-text", temperature=0.05))
    head = hand_made_head(method)
    out = method.forward_head(head, torch.tensor([[2.0, 0.0], [0.0, 5.0]]))
    assert torch.allclose(out["embedding"], unit([1.0, 0.0], [0.0, 1.0]))
    text = Vocabulary.trained(torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 1.0]]))  # unnormalized on purpose
    logits = method.logits(head, out, text)
    assert logits.shape == (2, 4)
    s = math.sqrt(0.5)
    expected = torch.tensor([[0.0, 1.0, s, 0.0], [-1.0, 0.0, s, 1.0]]) / 0.05
    assert torch.allclose(logits, expected, atol=1e-4)
    scores = method.scores(head, out, text)
    assert scores.shape == (2, 3)
    assert torch.allclose(scores, F.softmax(expected, dim=-1)[:, 1:], atol=1e-6)
    assert torch.allclose(1 - scores.sum(dim=1), F.softmax(expected, dim=-1)[:, 0], atol=1e-6)  # background: the rest


def test_temperature_is_a_buffer_unless_learned():
    fixed = ViLDText(ViLDConfig(temperature=0.01)).build_head(4, 3)
    assert all(p.numel() != 1 for p in fixed.parameters())
    assert fixed.temperature.item() == pytest.approx(0.01)
    assert "logit_scale" in fixed.state_dict()  # recorded in checkpoints either way
    learned_method = ViLDText(ViLDConfig(temperature=0.01, learn_temperature=True))
    learned = learned_method.build_head(4, 3)
    assert learned.logit_scale.requires_grad
    out = learned_method.forward_head(learned, torch.randn(5, 4))
    loss = learned_method.losses(learned, out, torch.tensor([0, 1, 2, 3, 1]), Vocabulary.trained(torch.randn(3, 3)), None)["loss_cls"]
    loss.backward()
    assert learned.logit_scale.grad is not None and learned.logit_scale.grad != 0


def test_text_loss_is_cross_entropy_with_background_label_zero():
    method = ViLDText(ViLDConfig(temperature=0.1))
    head = hand_made_head(method)
    out = method.forward_head(head, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
    text = Vocabulary.trained(unit([1.0, 0.0], [0.0, 1.0]))
    labels = torch.tensor([1, 2, 0])
    losses = method.losses(head, out, labels, text, None)
    assert set(losses) == {"loss_cls"}
    expected = F.cross_entropy(method.logits(head, out, text), labels)
    assert losses["loss_cls"].item() == pytest.approx(expected.item())
    # the third region points at the background embedding: its label 0 is its argmax
    assert method.logits(head, out, text)[2].argmax().item() == 0


def test_vild_image_loss_is_weighted_l1_summed_over_d_and_averaged_over_boxes():
    method = ViLD(ViLDConfig(temperature=0.01, name="vild", distill_weight=0.5))
    head = hand_made_head(method)
    rois = method.forward_head(head, torch.tensor([[1.0, 0.0]]))
    regions = method.forward_head(head, torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    targets = torch.tensor([[0.0, 1.0], [0.0, 4.0]])  # second one is renormalized to (0, 1)
    distill = DistillOutputs(regions, targets, torch.tensor([0.1, 5.0]), torch.tensor([0, 1]))
    losses = method.losses(head, rois, torch.tensor([1]), Vocabulary.trained(unit([1.0, 0.0])), distill)
    # |1-0| + |0-1| = 2 for box 1, 0 for box 2 -> mean 1, times w = 0.5 (weights ignored)
    assert losses["loss_distill"].item() == pytest.approx(0.5)
    assert set(losses) == {"loss_cls", "loss_distill"}


def test_vild_image_loss_without_boxes_is_zero_but_keeps_the_graph():
    method = ViLD(ViLDConfig(temperature=0.01, name="vild", distill_weight=1.0))
    head = method.build_head(3, 2)
    rois = method.forward_head(head, torch.randn(4, 3))
    empty = method.forward_head(head, torch.zeros(0, 3))
    for distill in (None, DistillOutputs(empty, torch.zeros(0, 2), torch.zeros(0), torch.zeros(0, dtype=torch.long))):
        loss = method.losses(head, rois, torch.tensor([0, 1, 0, 1]), Vocabulary.trained(torch.randn(1, 2)), distill)["loss_distill"]
        assert loss.item() == 0.0 and loss.requires_grad


def test_registry_builds_by_name_and_names_what_exists():
    assert isinstance(build_method(ViLDConfig(temperature=0.01, name="vild-text")), ViLDText)
    vild = build_method(ViLDConfig(temperature=0.01, name="vild", distill_weight=0.5))
    assert isinstance(vild, ViLD) and vild.distills and vild.cfg.distill_weight == 0.5
    assert not build_method(ViLDConfig(temperature=0.01, name="vild-text")).distills
    assert {"vild", "vild-text"} <= set(available_methods())
    for name in ("cliff", "no-such-method"):
        if name in available_methods():
            continue
        with pytest.raises(NotImplementedError, match="available methods: .*vild"):
            build_method(ViLDConfig.model_construct(name=name))


def test_ensemble_branches_take_one_loss_each():
    method = ViLDEnsemble(ViLDConfig(temperature=0.01, name="vild-ensemble", distill_weight=0.5))
    head = method.build_head(3, 2)
    rois = method.forward_head(head, torch.randn(4, 3))
    regions = method.forward_head(head, torch.randn(2, 3))
    distill = DistillOutputs(regions, torch.randn(2, 2), torch.ones(2), torch.tensor([0, 1]))
    losses = method.losses(head, rois, torch.tensor([0, 1, 0, 1]), Vocabulary.trained(torch.randn(1, 2)), distill)
    losses["loss_cls"].backward(retain_graph=True)
    assert head.image_projection.weight.grad is None and head.projection.weight.grad.abs().sum() > 0
    head.zero_grad(set_to_none=True)
    losses["loss_distill"].backward()
    assert head.projection.weight.grad is None and head.image_projection.weight.grad.abs().sum() > 0
    # The image loss is ViLD's L1 on the image branch.
    expected = 0.5 * (regions["image_embedding"] - F.normalize(distill.targets, dim=-1)).abs().sum(1).mean()
    assert losses["loss_distill"].item() == pytest.approx(expected.item())


def test_ensemble_scores_are_geometric_means_weighted_by_kind():
    method = ViLDEnsemble(ViLDConfig(name="vild-ensemble", temperature=0.5))
    head = method.build_head(2, 2)
    with torch.no_grad():
        head.projection.weight.copy_(torch.eye(2))
        head.image_projection.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        head.projection.bias.zero_()
        head.image_projection.bias.zero_()
    out = method.forward_head(head, torch.tensor([[1.0, 0.2]]))
    text = unit([1.0, 0.0], [0.0, 1.0])
    vocab = Vocabulary(text, torch.tensor([False, True]))
    p_text = ViLDText.scores(method, head, out, vocab)
    p_img = F.softmax(out["image_embedding"] @ text.t() / 0.5, dim=-1)
    expected = torch.stack([p_text[:, 0] ** (2 / 3) * p_img[:, 0] ** (1 / 3),
                            p_text[:, 1] ** (1 / 3) * p_img[:, 1] ** (2 / 3)], dim=1)
    assert torch.allclose(method.scores(head, out, vocab), expected, atol=1e-6)

"""The seam's optional parts: a method's own box branch (per-class deltas; without one the
class-agnostic regression is untouched), a seeded generator at inference, and
diagnostics that are logged, not optimised."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ovdlab.methods.base import RegionContext, Vocabulary
from ovdlab.methods.vild import ViLDText
from ovdlab.platform.config import EvalConfig, ModelConfig, ViLDConfig
from ovdlab.platform.detector import build_detector
from ovdlab.platform.train.loop import total_loss

EMBED, CLASSES = 8, 3
CFG = ModelConfig(backbone="resnet18", fpn_channels=16, representation_size=32, min_size=64, max_size=64,
                  rpn_pre_nms_top_n=60, rpn_post_nms_top_n=20, rpn_batch_size_per_image=32, roi_batch_size_per_image=16)


class PerClassCopy(ViLDText):
    """A box branch that gives every class the class-agnostic deltas: the per-class path
    must then reproduce the default path exactly."""

    def build_box_head(self, in_features: int, embed_dim: int) -> nn.Module:
        return nn.Linear(in_features, 4)

    def box_deltas(self, box_head: nn.Module, features: Tensor, head_out: dict[str, Tensor], vocab: Vocabulary) -> Tensor:
        return box_head(features)[:, None].expand(-1, vocab.size, 4)


class Sampling(ViLDText):
    """Scores with noise drawn from the inference generator (as a diffusion sampler would)."""

    def scores(self, head, head_out, vocab, regions=None):
        base = super().scores(head, head_out, vocab, regions)
        noise = torch.rand(base.shape, generator=regions.generator if regions is not None else None)
        return (base + noise).clamp(max=1.0)


def _model(method) -> nn.Module:
    torch.manual_seed(0)
    model = build_detector(CFG, method, EMBED)
    torch.manual_seed(1)
    model.set_vocabulary(Vocabulary.trained(torch.nn.functional.normalize(torch.randn(CLASSES, EMBED), dim=1)))
    return model


def _data():
    gen = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 64, 64, generator=gen), torch.rand(3, 64, 64, generator=gen)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0], [0.0, 30.0, 20.0, 60.0]]), "labels": torch.tensor([1, 3])}]
    return images, targets


def test_without_a_box_branch_regression_is_the_class_agnostic_linear_and_per_class_decoding_agrees():
    default, per_class = _model(ViLDText(ViLDConfig(temperature=0.01))), _model(PerClassCopy(ViLDConfig(temperature=0.01)))
    assert isinstance(default.roi_heads.box_predictor, nn.Linear) and default.roi_heads.box_predictor.out_features == 4
    assert not default.roi_heads.per_class_boxes and per_class.roi_heads.per_class_boxes
    per_class.load_state_dict(default.state_dict())
    images, targets = _data()
    for model in (default, per_class):
        model.train()
    torch.manual_seed(3)
    a = default(images, targets)
    torch.manual_seed(3)
    b = per_class(images, targets)
    assert torch.equal(a["loss_box"], b["loss_box"]) and torch.equal(a["loss_cls"], b["loss_cls"])
    for model in (default, per_class):
        model.eval()
        model.set_inference(EvalConfig(score_thresh=0.0))
    with torch.no_grad():
        for x, y in zip(default(images), per_class(images)):
            assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["scores"], y["scores"])


def test_per_class_boxes_are_decoded_for_their_class():
    heads = _model(PerClassCopy(ViLDConfig(temperature=0.01))).roi_heads
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]]])  # one RoI, two classes
    scores = torch.tensor([[0.9, 0.8]])
    out = heads.postprocess(boxes, scores, (64, 64), None)
    by_label = {int(label): box.tolist() for label, box in zip(out["labels"], out["boxes"])}
    assert by_label == {0: [0.0, 0.0, 10.0, 10.0], 1: [20.0, 20.0, 40.0, 40.0]}


def test_the_inference_generator_is_seeded_by_eval_seed():
    model = _model(Sampling(ViLDConfig(temperature=0.01))).eval()
    images, _ = _data()

    def detect(seed: int):
        model.set_inference(EvalConfig(seed=seed, score_thresh=0.0))
        with torch.no_grad():
            return model(images)[0]["scores"]

    first, again, other = detect(0), detect(0), detect(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert RegionContext().generator is None


def test_only_loss_terms_are_optimised_diagnostics_are_logged():
    terms = {"loss_cls": torch.tensor(1.5), "loss_box": torch.tensor(0.5), "kl_value": torch.tensor(100.0)}
    assert total_loss(terms).item() == 2.0

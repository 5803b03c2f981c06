"""ViLD (Gu et al., "Open-vocabulary Object Detection via Vision and Language Knowledge
Distillation", ICLR 2022): ViLD-text and ViLD (text + image distillation).

Equations of the paper, with ``e_r`` the region embedding of RoI ``r``:

- ViLD-text (Sec. 3.3, Eq. 1): ``e_r = normalize(W h_r)`` (box-head feature ``h_r``
  projected to the text dimension), ``z(r) = [sim(e_r, e_bg), sim(e_r, t_1), ...,
  sim(e_r, t_|C_B|)]`` with cosine ``sim`` and a learned background embedding
  ``e_bg``, ``L_text = 1/N sum_r CE(softmax(z(r) / tau), y_r)``, ``tau = 0.01`` -- CLIP's
  1 / 100; here ``tau`` is the teacher's, ``1 / logit_scale`` (``method.temperature``).
- ViLD-image (Sec. 3.4, Eq. 2): ``L_image = 1/M sum_{r~} || V(crop(I, r~)) - e_r~ ||_1``
  over the M pre-computed proposals ``r~`` of the batch, ``V`` the CLIP image
  encoder (its normalized embeddings come from the region store).
- ViLD (Eq. 3): ``L = L_text + w * L_image`` (w = 0.5 for R50 in the paper).

- ViLD-ensemble (Sec. 3.4): a separate image branch takes the image loss, the text
  branch only ``L_text``; test scores ``p_text^lambda * p_img^(1 - lambda)``, lambda
  2/3 for base and 1/3 for novel classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovdlab.methods.base import DistillOutputs, Method, RegionContext, Vocabulary, anchor_to_graph
from ovdlab.platform.config import ExperimentConfig
from ovdlab.platform.recipes.stages import Stage


class ViLDHead(nn.Module):
    """Region feature -> normalized region embedding, plus background and temperature.

    ``logit_scale`` stores ``log(1 / T)`` (as CLIP does) so that a learnable
    temperature stays positive; it is a parameter when ``learn_temperature`` and a
    persistent buffer otherwise, so a checkpoint always records the temperature used.
    """

    def __init__(self, in_features: int, embed_dim: int, temperature: float | None, learn_temperature: bool) -> None:
        super().__init__()
        if temperature is None:
            raise ValueError("method.temperature is unset (the teacher's): calibrate the config with the teacher's "
                             "logit scale first (ovdlab.platform.config.calibrate), or set a number")
        self.projection = nn.Linear(in_features, embed_dim)
        self.background = nn.Parameter(torch.randn(embed_dim) * embed_dim**-0.5)
        scale = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        return {"embedding": F.normalize(self.projection(features), dim=-1)}

    @property
    def temperature(self) -> Tensor:
        return torch.exp(-self.logit_scale)


class ViLDText(Method):
    """ViLD-text: cosine logits against the frozen text bank, softmax CE (Eq. 1)."""

    name = "vild-text"

    def build_head(self, in_features: int, embed_dim: int, classes: Vocabulary | None = None) -> ViLDHead:
        return ViLDHead(in_features, embed_dim, self.cfg.temperature, self.cfg.learn_temperature)

    def logits(self, head: nn.Module, head_out: dict[str, Tensor], vocab: Vocabulary) -> Tensor:
        """``z(r) / tau``: cosine to [background, t_1..t_C] times ``1 / T`` (Eq. 1)."""
        region = head_out["embedding"]
        text = F.normalize(vocab.embeddings, dim=-1)
        classifier = torch.cat([F.normalize(head.background, dim=-1)[None], text], dim=0)
        return region @ classifier.to(region.dtype).t() * head.logit_scale.exp()

    def losses(
        self,
        head: nn.Module,
        head_out: dict[str, Tensor],
        labels: Tensor,
        vocab: Vocabulary,
        distill: DistillOutputs | None,
    ) -> dict[str, Tensor]:
        logits = self.logits(head, head_out, vocab)
        return {"loss_cls": F.cross_entropy(logits.float(), labels)}

    def scores(
        self, head: nn.Module, head_out: dict[str, Tensor], vocab: Vocabulary, regions: RegionContext | None = None
    ) -> Tensor:
        """Softmax over background + vocabulary, background column dropped (ViLD does not
        use the proposals' objectness)."""
        return F.softmax(self.logits(head, head_out, vocab).float(), dim=-1)[:, 1:]


class ViLD(ViLDText):
    """ViLD: ViLD-text plus the ViLD-image L1 distillation (Eqs. 2-3).

    The per-box ``weights`` of :class:`DistillOutputs` are ignored: the paper averages
    the L1 distance uniformly over the distillation proposals. Teacher embeddings are
    re-normalized (the paper distills to normalized CLIP embeddings; this guards
    against a store written without normalization).
    """

    name = "vild"
    distills = True

    def recipe(self, cfg: ExperimentConfig) -> list[Stage]:
        """RPN proposals come from a detector trained on base boxes only (Sec. 3.4: the
        M proposals are precomputed by an RPN trained on base categories): first the
        ViLD-text experiment of the same dataset (the same training as that method's own
        run, so the runner trains it once), whose final RPN the store's extraction reads.
        A config naming its ``proposals.checkpoint`` or another source is one training."""
        if cfg.proposals.source != "rpn" or cfg.proposals.checkpoint is not None:
            return super().recipe(cfg)
        return [
            Stage("proposal-detector", "train", experiment=f"experiments/vild_text_{cfg.dataset.kind}"),
            *self.store_stages({"proposals.checkpoint": "proposal-detector"}),
            Stage("train", "train", reads={"proposals.checkpoint": "proposal-detector"}),
        ]

    distilled = "embedding"
    """The head output the image loss pulls to the teacher's embeddings."""

    def losses(
        self,
        head: nn.Module,
        head_out: dict[str, Tensor],
        labels: Tensor,
        vocab: Vocabulary,
        distill: DistillOutputs | None,
    ) -> dict[str, Tensor]:
        out = super().losses(head, head_out, labels, vocab, distill)
        out["loss_distill"] = self.cfg.distill_weight * self.image_loss(head_out, distill, self.distilled)
        return out

    @staticmethod
    def image_loss(head_out: dict[str, Tensor], distill: DistillOutputs | None, key: str = "embedding") -> Tensor:
        """``1/M sum ||e_clip - e_r~||_1`` (Eq. 2) on the head output ``key``, L1 summed
        over D, averaged over boxes.

        Zero (still connected to the head's graph) when the batch has no boxes.
        """
        if distill is None or distill.num_boxes == 0:
            anchors = [head_out[key]] + ([distill.head_out[key]] if distill is not None else [])
            return anchor_to_graph(*anchors)
        region = distill.head_out[key].float()
        target = F.normalize(distill.targets.float(), dim=-1)
        return (region - target).abs().sum(dim=1).mean()


class ViLDEnsembleHead(ViLDHead):
    """:class:`ViLDHead` plus a separate image branch: ``image_embedding = normalize(W' h_r)``."""

    def __init__(self, in_features: int, embed_dim: int, temperature: float | None, learn_temperature: bool) -> None:
        super().__init__(in_features, embed_dim, temperature, learn_temperature)
        self.image_projection = nn.Linear(in_features, embed_dim)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        return {**super().forward(features), "image_embedding": F.normalize(self.image_projection(features), dim=-1)}


class ViLDEnsemble(ViLD):
    """ViLD-ensemble (Sec. 3.4, "Model ensembling"): the text branch is trained by the
    classification loss only and a separate image branch by the distillation loss only,
    so distilling the teacher's view of every proposal (background included) never bends
    the classifier's embedding. At test time the two are combined per class by a
    geometric mean, ``p_text^lambda * p_img^(1 - lambda)`` with ``lambda = 2/3`` for the
    classes trained on and ``1/3`` for the novel ones (the vocabulary's ``is_novel``),
    ``p_img = softmax(cos(e_img, t) / T)`` over the vocabulary.
    """

    name = "vild-ensemble"
    distilled = "image_embedding"
    TEXT_WEIGHT_TRAINED = 2.0 / 3.0
    TEXT_WEIGHT_NOVEL = 1.0 / 3.0

    def build_head(self, in_features: int, embed_dim: int, classes: Vocabulary | None = None) -> ViLDEnsembleHead:
        return ViLDEnsembleHead(in_features, embed_dim, self.cfg.temperature, self.cfg.learn_temperature)

    def scores(
        self, head: nn.Module, head_out: dict[str, Tensor], vocab: Vocabulary, regions: RegionContext | None = None
    ) -> Tensor:
        """``p_text^lambda * p_img^(1 - lambda)`` per class, lambda by the class's kind."""
        p_text = super().scores(head, head_out, vocab, regions)
        text = F.normalize(vocab.embeddings, dim=-1)
        image = head_out["image_embedding"].float()
        p_image = F.softmax(image @ text.to(image.dtype).t() * head.logit_scale.exp(), dim=-1)
        weight = torch.where(vocab.is_novel, self.TEXT_WEIGHT_NOVEL, self.TEXT_WEIGHT_TRAINED).to(p_text.dtype)
        return p_text.pow(weight) * p_image.pow(1.0 - weight)

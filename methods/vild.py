"""ViLD (Gu et al., "Open-vocabulary Object Detection via Vision and Language Knowledge
Distillation", ICLR 2022): ViLD-text and ViLD (text + image distillation).

Equations of the paper, with ``e_r`` the region embedding of RoI ``r``:

- ViLD-text (Sec. 3.3, Eq. 1): ``e_r = normalize(W h_r)`` (box-head feature ``h_r``
  projected to the text dimension), ``z(r) = [sim(e_r, e_bg), sim(e_r, t_1), ...,
  sim(e_r, t_|C_B|)]`` with cosine ``sim`` and a learned background embedding
  ``e_bg``, ``L_text = 1/N sum_r CE(softmax(z(r) / tau), y_r)``, ``tau = 0.01``.
- ViLD-image (Sec. 3.4, Eq. 2): ``L_image = 1/M sum_{r~} || V(crop(I, r~)) - e_r~ ||_1``
  over the M pre-computed proposals ``r~`` of the batch, ``V`` the CLIP image
  encoder (its normalized embeddings come from the region store).
- ViLD (Eq. 3): ``L = L_text + w * L_image`` (w = 0.5 for R50 in the paper).

ViLD-ensemble (a separate image branch combined at test time) is not built here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovdlab.methods.base import DistillOutputs, Method, Vocabulary, anchor_to_graph
from ovdlab.platform.config import ExperimentConfig
from ovdlab.platform.recipes.stages import Stage


class ViLDHead(nn.Module):
    """Region feature -> normalized region embedding, plus background and temperature.

    ``logit_scale`` stores ``log(1 / T)`` (as CLIP does) so that a learnable
    temperature stays positive; it is a parameter when ``learn_temperature`` and a
    persistent buffer otherwise, so a checkpoint always records the temperature used.
    """

    def __init__(self, in_features: int, embed_dim: int, temperature: float, learn_temperature: bool) -> None:
        super().__init__()
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

    def build_head(self, in_features: int, embed_dim: int) -> ViLDHead:
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

    def scores(self, head: nn.Module, head_out: dict[str, Tensor], vocab: Vocabulary) -> Tensor:
        """Softmax over background + vocabulary, background column dropped."""
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
        run, so the runner trains it once), whose final RPN the extraction reads.
        A config naming its ``proposals.checkpoint`` or another source is one training."""
        if cfg.proposals.source != "rpn" or cfg.proposals.checkpoint is not None:
            return super().recipe(cfg)
        return [
            Stage("proposal-detector", "train", experiment=f"experiments/vild_text_{cfg.dataset.kind}"),
            Stage("train", "train", reads={"proposals.checkpoint": "proposal-detector"}),
        ]

    def losses(
        self,
        head: nn.Module,
        head_out: dict[str, Tensor],
        labels: Tensor,
        vocab: Vocabulary,
        distill: DistillOutputs | None,
    ) -> dict[str, Tensor]:
        out = super().losses(head, head_out, labels, vocab, distill)
        out["loss_distill"] = self.cfg.distill_weight * self.image_loss(head_out, distill)
        return out

    @staticmethod
    def image_loss(head_out: dict[str, Tensor], distill: DistillOutputs | None) -> Tensor:
        """``1/M sum ||e_clip - e_r~||_1`` (Eq. 2), L1 summed over D, averaged over boxes.

        Zero (still connected to the head's graph) when the batch has no boxes.
        """
        if distill is None or distill.num_boxes == 0:
            anchors = [head_out["embedding"]] + ([distill.head_out["embedding"]] if distill is not None else [])
            return anchor_to_graph(*anchors)
        region = distill.head_out["embedding"].float()
        target = F.normalize(distill.targets.float(), dim=-1)
        return (region - target).abs().sum(dim=1).mean()

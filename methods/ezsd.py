"""EZSD (Liu, Hu & Nevatia, "Efficient Feature Distillation for Zero-shot Annotation Object
Detection", WACV 2024): distill a LayerNorm-tuned CLIP on the regions that matter, cheaply.

With ``e_r = normalize(W h_r)`` the region embedding of RoI ``r`` and ``t_c`` the frozen,
normalized text embedding of class ``c``:

- Classification (Sec. 3.4): ``z(r) = T [e_r . b, e_r . t_1, ..., e_r . t_C]`` with a
  learned background vector ``b`` (not normalized: the reference's bias-free
  ``Linear(D, 1)``) and a learnable temperature ``T`` (stored as ``log T``, initialised
  at 100); softmax cross-entropy over the base classes.
- Distillation (Sec. 3.4): L1 between ``e_m`` and the LN-tuned teacher's embedding
  ``v_m`` of the M regions of the store, the image's base ground-truth boxes (weight 1)
  and its CLIP proposals (weight = the teacher's max class probability, the store's
  ``confidence``), weights renormalized to mean 1 within each image:
  ``L_distill = w_d * D * 1/(M D) sum_m w_m ||e_m - v_m||_1`` -- the reference's
  element-wise mean times ``clip_dim`` (512 for ViT-B/32) times the distillation factor
  ``w_d`` (1.0 COCO, 0.5 LVIS), i.e. the L1 summed over dimensions, averaged over boxes.
- Box regression conditioned on the class (the reference's ``reg_with_cls_embedding``):
  ``delta_c(r) = A [g(h_r); t_c]``, one linear map of the box-head feature concatenated
  with the class's text embedding. Training regresses each positive RoI with its ground
  truth class's embedding, as the reference does; inference decodes every class's own
  box (the reference decodes only the argmax class's, the same box for that class).

The stages before training (LN-tuning the teacher, CLIP proposals filtered against base
ground truth, the store of proposal and ground-truth embeddings) are the recipe's
(:meth:`EZSD.recipe`), run by the platform (``ovdlab.platform.teacher.ln_tuning``,
``ovdlab.platform.proposals.clip_proposals``, ``ovdlab.platform.pipelines.extract``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovdlab.methods.base import DistillOutputs, RegionContext, Vocabulary, anchor_to_graph
from ovdlab.methods.vild import ViLDHead, ViLDText
from ovdlab.platform.config import ExperimentConfig
from ovdlab.platform.recipes.stages import Stage


class TextConditionedBoxHead(nn.Module):
    """``delta_c(r) = A [h_r; t_c] + a`` for every class ``c``: ``[R, C, 4]``.

    The concatenation's linear map splits into a feature part and a text part, so all
    classes cost one ``[R, 4]`` and one ``[C, 4]`` product. Initialised like the
    platform's class-agnostic regressor (normal, std 0.001; zero bias).
    """

    def __init__(self, in_features: int, embed_dim: int) -> None:
        super().__init__()
        self.feature = nn.Linear(in_features, 4)
        self.text = nn.Linear(embed_dim, 4, bias=False)
        for layer in (self.feature, self.text):
            nn.init.normal_(layer.weight, std=0.001)
        nn.init.zeros_(self.feature.bias)

    def forward(self, features: Tensor, text: Tensor) -> Tensor:
        return self.feature(features)[:, None, :] + self.text(text.to(features.dtype))[None, :, :]


class EZSD(ViLDText):
    """EZSD's head, losses, box branch and recipe (see the module doc)."""

    name = "ezsd"
    distills = True
    distills_ground_truth = True

    def build_head(self, in_features: int, embed_dim: int, classes: Vocabulary | None = None) -> ViLDHead:
        return ViLDHead(in_features, embed_dim, self.cfg.temperature, self.cfg.learn_temperature)

    def build_box_head(self, in_features: int, embed_dim: int) -> TextConditionedBoxHead:
        return TextConditionedBoxHead(in_features, embed_dim)

    def box_deltas(self, box_head: nn.Module, features: Tensor, head_out: dict[str, Tensor], vocab: Vocabulary) -> Tensor:
        """``[R, C, 4]``: each class's deltas from its normalized text embedding."""
        return box_head(features, F.normalize(vocab.embeddings, dim=-1))

    def logits(self, head: nn.Module, head_out: dict[str, Tensor], vocab: Vocabulary) -> Tensor:
        """``T [e . b, e . t_1, ..., e . t_C]`` (background first, ``b`` not normalized)."""
        region = head_out["embedding"]
        text = F.normalize(vocab.embeddings, dim=-1).to(region.dtype)
        classifier = torch.cat([head.background[None].to(region.dtype), text], dim=0)
        return region @ classifier.t() * head.logit_scale.exp()

    def losses(
        self,
        head: nn.Module,
        head_out: dict[str, Tensor],
        labels: Tensor,
        vocab: Vocabulary,
        distill: DistillOutputs | None,
    ) -> dict[str, Tensor]:
        out = super().losses(head, head_out, labels, vocab, distill)
        out["loss_distill"] = self.cfg.distill_weight * self.distill_loss(head_out, distill)
        out["temperature"] = head.temperature.detach()
        return out

    @staticmethod
    def distill_loss(head_out: dict[str, Tensor], distill: DistillOutputs | None) -> Tensor:
        """``D * 1/(M D) sum_m w_m |e_m - v_m|``, ``w`` renormalized to mean 1 per image
        (the reference's ``weight_per_img * n / sum``); zero in the graph without boxes."""
        if distill is None or distill.num_boxes == 0:
            anchors = [head_out["embedding"]] + ([distill.head_out["embedding"]] if distill is not None else [])
            return anchor_to_graph(*anchors)
        region = distill.head_out["embedding"].float()
        target = F.normalize(distill.targets.float(), dim=-1)
        weights = per_image_mean_one(distill.weights.float(), distill.image_index)
        return (weights[:, None] * (region - target).abs()).mean() * region.shape[1]

    def scores(
        self, head: nn.Module, head_out: dict[str, Tensor], vocab: Vocabulary, regions: RegionContext | None = None
    ) -> Tensor:
        """Softmax over background + vocabulary, background dropped (objectness unused)."""
        return F.softmax(self.logits(head, head_out, vocab).float(), dim=-1)[:, 1:]

    def recipe(self, cfg: ExperimentConfig) -> list[Stage]:
        """Teacher (LN-tuned, its crop accuracy before and after) -> store (CLIP proposals
        and ground-truth boxes embedded by the tuned teacher) -> detector training.

        The store is its own ``extract`` stage so that its minutes and MLflow run stand
        apart (the training finds the finished store by its key). With RPN proposals (the
        paper's ablation) and no ``proposals.checkpoint``, a detector trained on base boxes
        proposes first, ViLD-text's training of the same dataset, as in ViLD's recipe.
        """
        stages: list[Stage] = [Stage("teacher", "teacher")]
        reads: dict[str, str] = {}
        if cfg.proposals.source == "rpn" and cfg.proposals.checkpoint is None:
            stages.append(Stage("proposal-detector", "train", experiment=f"experiments/vild_text_{cfg.dataset.kind}"))
            reads = {"proposals.checkpoint": "proposal-detector"}
        return [*stages, *self.store_stages(reads), Stage("train", "train", reads=reads)]


def per_image_mean_one(weights: Tensor, image_index: Tensor) -> Tensor:
    """``weights`` scaled so that each image's mean is 1 (EZSD's per-image renormalization);
    an image whose weights sum to 0 keeps zeros."""
    count = torch.zeros(int(image_index.max()) + 1, dtype=weights.dtype, device=weights.device)
    total = torch.zeros_like(count)
    count.index_add_(0, image_index, torch.ones_like(weights))
    total.index_add_(0, image_index, weights)
    factor = torch.where(total > 0, count / total.clamp_min(torch.finfo(weights.dtype).tiny), torch.zeros_like(total))
    return weights * factor[image_index]

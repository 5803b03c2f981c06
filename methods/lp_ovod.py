"""LP-OVOD (Pham et al., "LP-OVOD: Open-Vocabulary Object Detection by Linear Probing",
WACV 2024): a sigmoid detector with learned class prototypes, ViLD-style distillation in
a separate image branch, retrieval of pseudo-labels for novel classes, and a linear probe.

With ``h_r`` the box-head feature of RoI ``r`` (the 1024-d FC output in the paper):

- Text branch (Sec. 3.1): ``logit_c(r) = h_r . P_c`` with learnable prototypes ``P``
  (base rows trained in the base phase, novel rows zero-initialised and trained only by
  the probe); sigmoid focal loss (gamma 2, alpha 0.25) over the vocabulary, background
  RoIs with an all-zero target, summed and divided by the number of sampled RoIs
  (mmdet's ``FocalLoss`` with ``avg_factor`` = sampled RoIs).
- Image branch: ``e_img(r) = normalize(W h_r)`` in the teacher's space, L1 to the stored
  teacher embeddings of every proposal of the image, element-wise mean times 256
  (mmdet's ``L1Loss(loss_weight=256)``).
- Retrieval (Sec. 3.2, the ``retrieval`` stage): per novel class, the top K = 100
  training proposals with objectness >= 0.6 by cosine of their stored teacher embedding
  to the class's text embedding become pseudo-labelled boxes.
- Linear probe (Sec. 3.3, the ``probe`` stage): everything frozen but the novel
  prototypes, trained with the same focal loss on the pseudo-labels (lr 0.001).
- Inference (Sec. 3.4): base score ``sigmoid(h . P_base)``; novel score
  ``s_img^0.2 * s_text^0.8`` with ``s_text = sigmoid(h . P_novel)`` and ``s_img`` the
  softmax over the vocabulary of ``cos(e_img, t) / 0.01``; with the proposals'
  objectness ``o``, the final score is ``sqrt(score * o)``.

Not copied from the reference: embeddings written as fp16 and read back as fp32 (the
store reads them as written), distillation boxes left unflipped and unscaled when the
image is flipped and resized (here they go through the image's transform), prompt
templates discarded (``teacher.prompt: names`` is the bare-name recipe, by choice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from ovdlab.methods.base import DistillOutputs, Method, RegionContext, Vocabulary, anchor_to_graph
from ovdlab.platform.config import ExperimentConfig
from ovdlab.platform.data.pseudo_labels import PseudoLabels, write_pseudo_labels
from ovdlab.platform.recipes.stages import Stage
from ovdlab.platform.store.retrieval import Retrieved

NOVEL_TEXT_POWER = 0.8
"""``s_img^(1 - 0.8) * s_text^0.8`` for novel classes (Sec. 3.4)."""
PROBE_LR = 0.001
"""The probe's learning rate (Sec. 4.1: lr 0.001)."""
PROBE_FROZEN = (
    "backbone", "rpn", "box_head", "box_predictor",
    "roi_heads.method_head.base_prototypes", "roi_heads.method_head.image_projection",
)
"""Everything but the novel prototypes (Sec. 3.3: the whole detector is frozen)."""
RETRIEVAL_KEYS = ("method.retrieval_k", "method.objectness_floor")
"""What only the retrieval (and so the probe) reads: the base training ignores them."""


class LPOVODHead(nn.Module):
    """Prototypes of the evaluation classes (base then novel rows) and the image branch.

    Rows are found by class name, so a vocabulary in any order (training: base classes;
    evaluation: every class; prediction: any list) gets its own prototypes; a name
    without a row (a class the run never knew) scores with a zero prototype, as an
    unprobed novel class does.
    """

    def __init__(self, in_features: int, embed_dim: int, classes: Vocabulary | None) -> None:
        super().__init__()
        names = classes.names if classes is not None else ()
        novel = classes.is_novel.tolist() if classes is not None else []
        if classes is not None and not names:
            raise ValueError("LP-OVOD needs class names in its vocabulary to place its prototypes")
        base_names = [n for n, is_novel in zip(names, novel) if not is_novel]
        novel_names = [n for n, is_novel in zip(names, novel) if is_novel]
        self.rows = {name: i for i, name in enumerate([*base_names, *novel_names])}
        self.base_prototypes = nn.Parameter(torch.randn(len(base_names), in_features) * 0.01)
        self.novel_prototypes = nn.Parameter(torch.zeros(len(novel_names), in_features))
        self.image_projection = nn.Linear(in_features, embed_dim)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        return {"feature": features, "embedding": F.normalize(self.image_projection(features), dim=-1)}

    def prototypes(self, names: tuple[str, ...]) -> Tensor:
        """``[C, F]`` prototypes of ``names`` (zero rows for unknown names)."""
        if not names:
            raise ValueError("LP-OVOD scores against named classes; the vocabulary has no names")
        zero = self.base_prototypes.new_zeros(1, self.base_prototypes.shape[1])
        table = torch.cat([self.base_prototypes, self.novel_prototypes, zero])
        index = torch.tensor([self.rows.get(n, len(table) - 1) for n in names], device=table.device)
        return table[index]


class LPOVOD(Method):
    """LP-OVOD's head, losses, scores and recipe (see the module doc)."""

    name = "lp-ovod"
    distills = True

    def build_head(self, in_features: int, embed_dim: int, classes: Vocabulary | None = None) -> LPOVODHead:
        return LPOVODHead(in_features, embed_dim, classes)

    def logits(self, head: nn.Module, head_out: dict[str, Tensor], vocab: Vocabulary) -> Tensor:
        """``[R, 1 + C]``: a zero background column, then ``h . P_c`` (sigmoid logits)."""
        feature = head_out["feature"]
        text = feature @ head.prototypes(vocab.names).to(feature.dtype).t()
        return torch.cat([text.new_zeros(len(text), 1), text], dim=1)

    def losses(
        self,
        head: nn.Module,
        head_out: dict[str, Tensor],
        labels: Tensor,
        vocab: Vocabulary,
        distill: DistillOutputs | None,
    ) -> dict[str, Tensor]:
        out = {"loss_cls": self.focal_loss(self.logits(head, head_out, vocab)[:, 1:], labels)}
        if self.cfg.distill_weight > 0:
            out["loss_distill"] = self.cfg.distill_weight * self.image_loss(head_out, distill)
        return out

    def focal_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Sigmoid focal loss over the ``C`` classes; label 0 (background) has no positive
        class; summed over RoIs and classes, divided by the number of RoIs."""
        target = F.one_hot(labels, logits.shape[1] + 1)[:, 1:].to(torch.float32)
        loss = sigmoid_focal_loss(logits.float(), target, alpha=self.cfg.focal_alpha, gamma=self.cfg.focal_gamma,
                                  reduction="sum")
        return loss / max(len(labels), 1)

    @staticmethod
    def image_loss(head_out: dict[str, Tensor], distill: DistillOutputs | None) -> Tensor:
        """Element-wise mean ``|e_img - e_teacher|`` over the distillation boxes and
        dimensions (teacher embeddings re-normalized); a zero in the graph without boxes."""
        if distill is None or distill.num_boxes == 0:
            anchors = [head_out["embedding"]] + ([distill.head_out["embedding"]] if distill is not None else [])
            return anchor_to_graph(*anchors)
        target = F.normalize(distill.targets.float(), dim=-1)
        return (distill.head_out["embedding"].float() - target).abs().mean()

    def scores(
        self, head: nn.Module, head_out: dict[str, Tensor], vocab: Vocabulary, regions: RegionContext | None = None
    ) -> Tensor:
        """Base ``sigmoid(h . P)``; novel ``s_img^0.2 * s_text^0.8``; ``sqrt(. * objectness)``."""
        p_text = torch.sigmoid(self.logits(head, head_out, vocab)[:, 1:].float())
        image = head_out["embedding"].float()
        text = F.normalize(vocab.embeddings.float(), dim=-1)
        s_img = F.softmax(image @ text.t() / self.cfg.temperature, dim=-1)
        novel = s_img.pow(1.0 - NOVEL_TEXT_POWER) * p_text.pow(NOVEL_TEXT_POWER)
        score = torch.where(vocab.is_novel[None], novel, p_text)
        if regions is not None and regions.objectness is not None:
            score = torch.sqrt(score * regions.objectness.float()[:, None])
        return score

    def recipe(self, cfg: ExperimentConfig) -> list[Stage]:
        """[Proposal detector] -> store -> base training -> retrieval of pseudo-labels -> linear probe.

        The probe keeps the experiment's ``train.max_iter`` (the paper probes for as many
        epochs as the base training, 12) at a constant ``lr`` 0.001 without warmup, with
        every part but the novel prototypes frozen and no distillation.

        With RPN proposals and no ``proposals.checkpoint``, the proposals (distillation
        targets and retrieval candidates, with their objectness) come from the RPN of a
        detector trained on base boxes first, ViLD-text's training of the same dataset,
        as in ViLD's recipe (the runner trains it once for both).
        """
        reads: dict[str, str] = {}
        stages: list[Stage] = []
        if cfg.proposals.source == "rpn" and cfg.proposals.checkpoint is None:
            stages.append(Stage("proposal-detector", "train", experiment=f"experiments/vild_text_{cfg.dataset.kind}"))
            reads = {"proposals.checkpoint": "proposal-detector"}
        probe = (
            "method.distill_weight=0",
            f"train.lr={PROBE_LR}",
            "train.steps=[]",
            "train.warmup_iters=0",
            f"train.freeze=[{','.join(PROBE_FROZEN)}]",
        )
        return [
            *stages,
            *self.store_stages(reads),
            Stage("base", "train", reads=reads, ignores=RETRIEVAL_KEYS),
            Stage("retrieval", "post", function="ovdlab.methods.lp_ovod:retrieve_pseudo_labels", reads=reads),
            Stage("probe", "train", overrides=probe,
                  reads={**reads, "train.init_from": "base", "train.pseudo_labels": "retrieval"}),
        ]


def retrieve_pseudo_labels(cfg: ExperimentConfig, out_dir: Path) -> Path:
    """The retrieval stage: top ``method.retrieval_k`` stored training proposals per novel
    class with objectness >= ``method.objectness_floor``, written as pseudo-labels.

    Reads the region store of the base phase (the same content key, so the extraction is
    reused) and embeds the novel class names with the teacher and prompt recipe the
    detector was trained with.
    """
    from ovdlab.platform.data.catalog import load_dataset
    from ovdlab.platform.pipelines.extract import run_extraction
    from ovdlab.platform.store.reader import RegionStore
    from ovdlab.platform.store.retrieval import retrieve_topk
    from ovdlab.platform.teacher.prompts import cached_text_bank
    from ovdlab.platform.train.trainer import load_training_teacher

    val_set = load_dataset(cfg, "val")
    novel = [(cid, name) for cid, name in zip(val_set.category_ids, val_set.class_names) if cid in set(val_set.novel_ids)]
    if not novel:
        raise ValueError(f"{val_set.ann_json} has no novel classes to retrieve pseudo-labels for")
    teacher, _ = load_training_teacher(cfg)
    text = cached_text_bank(teacher, [n for _, n in novel], cfg.teacher.prompt, cfg.work_path("text_banks")).embeddings
    store_path = run_extraction(cfg, "train").store
    found = retrieve_topk(RegionStore(store_path), text.float().numpy(), k=cfg.method.retrieval_k,
                          min_score=cfg.method.objectness_floor)
    if not any(found):
        raise ValueError(
            f"retrieval found no training proposal with objectness >= method.objectness_floor="
            f"{cfg.method.objectness_floor} in {store_path}: the probe would have no pseudo-label "
            f"(a barely trained RPN, as in --smoke, needs a lower floor)"
        )
    source = {"store": str(store_path), "k": cfg.method.retrieval_k, "objectness_floor": cfg.method.objectness_floor}
    return write_pseudo_labels(pseudo_labels_from_hits(novel, found, source), out_dir / "pseudo_labels.json")


def pseudo_labels_from_hits(
    classes: list[tuple[int, str]], hits: list[list[Retrieved]], source: dict[str, Any]
) -> PseudoLabels:
    """Each class's retrieved regions as COCO boxes (xywh, original pixels) of that class;
    an empty box is dropped. ``source`` gains the count kept per class."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    kept: dict[str, int] = {}
    for (cid, name), found in zip(classes, hits):
        kept[name] = 0
        for hit in found:
            x1, y1, x2, y2 = (float(v) for v in hit.box)
            if x2 <= x1 or y2 <= y1:
                continue
            kept[name] += 1
            by_image.setdefault(hit.image_id, []).append({
                "image_id": hit.image_id, "category_id": cid, "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": hit.score, "similarity": hit.similarity,
            })
    return PseudoLabels(dict(classes), by_image, {**source, "per_class": kept})

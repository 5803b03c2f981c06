"""CLIFF's RoI head, losses and three-phase recipe (methods.md, "CLIFF").

With ``h_r`` the box-head feature of region ``r`` (R50-C4: the mean-pooled res5 output)
and ``t_c`` the normalized text embedding of class ``c``; reference files are those of
CUHK-AIM-Group/CLIFF (``ovd/modeling/roi_heads/zero_shot_classifier.py``,
``diffusion_lib.py``, the three ``configs/CLIFF_COCO_RCNN-C4_*.yaml``):

- Object feature ``x_r = W h_r`` (``D``, the CLIP width); class-agnostic box regression
  stays the platform's.
- Object-centric noise (stages 2 and 3, the reference's ``WITH_COND_NOISE``): a VAE layer
  ``x_r -> (mu_r, log var_r)``; the diffusion starts from its sample
  ``z_r = mu_r + sigma_r eps`` (``mu_r`` at test time), and
  ``L_kl = 1/R sum_r sum_d 1/2 (mu^2 + sigma^2 - 1 - log sigma^2)`` (summed over the
  dimensions, ``diffusion_lib.py``). Stage 1 starts from ``N(0, I)`` and has no KL.
- One diffuser (the reference's single ``ddpm_module``) serves both chains. Object ->
  image (stages 2 and 3): its first ``image_steps`` reverse steps from ``z_r``
  conditioned on ``x_r`` give ``img_r`` (the last clamped ``x0``); ``L_rec`` = mean L1
  between ``normalize(img)`` and the teacher's normalized embedding of the stored
  class-agnostic proposals (``F.normalize`` before ``F.l1_loss``, as the reference). The
  text condition is gated: ``cond_r = sigmoid(G img_r) * x_r`` (``G`` starts at zero: a
  constant 1/2 gate, which the condition's LayerNorm removes, so stage 2 starts from
  stage 1's generator).
- Object -> text: all ``T`` reverse steps of the diffuser from ``z_r`` under ``cond_r``
  give ``g_r``; logits ``[0, s cos(g_r, t_1), ..., s cos(g_r, t_C)]`` (``s`` half the
  teacher's logit scale: the reference's 50 under CLIP's 100; a zero background column),
  sigmoid binary cross-entropy against the one-hot label (background: all zero), summed
  over classes, averaged over regions.
- Generation: ``x_t = q(x0 = t_{y_r}, eps = z_r)`` with ``t_{y_r}`` the ground-truth
  class's text embedding (the zero vector for background); stage 1 takes every step
  ``t`` of every region with an MSE (the reference's ``WITH_OVER_SAMPLING``), stages 2 and
  3 one random step per region with an L1.

``L = L_cls + gen_weight L_gen + kl_weight L_kl + rec_weight L_rec`` (+ the box loss);
``rec_weight`` is 15 in stage 2 and 75 in stage 3 (``LOSS_WEIGHT_REGION_TO_IMAGE``). The
reference parses a KL weight and never applies it (effective weight 1), as here.
Inference samples with the generator the platform seeds from ``eval.seed``: the same seed
gives the same detections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovdlab.methods.base import DistillOutputs, Method, RegionContext, Vocabulary, anchor_to_graph
from ovdlab.methods.cliff.diffusion import CosineSchedule, Diffuser, sample
from ovdlab.platform.config import ExperimentConfig
from ovdlab.platform.recipes.stages import Stage

LOGVAR_RANGE = (-10.0, 10.0)
"""Bounds of the VAE layer's log variance (keeps ``exp`` finite early in training)."""


class CLIFFHead(nn.Module):
    """Object projection, VAE layer, gate, the diffuser both chains share and its schedule."""

    def __init__(self, in_features: int, embed_dim: int, steps: int, cosine_s: float) -> None:
        super().__init__()
        self.object = nn.Linear(in_features, embed_dim)
        self.vae = nn.Linear(embed_dim, 2 * embed_dim)
        self.gate = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.diffuser = Diffuser(embed_dim)
        self.schedule = CosineSchedule(steps, cosine_s)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        x = self.object(features)
        mu, logvar = self.vae(x).chunk(2, dim=-1)
        return {"object": x, "mu": mu, "logvar": logvar.clamp(*LOGVAR_RANGE)}


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mu, sigma^2) || N(0, I))`` summed over dimensions, averaged over rows (the
    reference's ``-0.5 * sum(1 + logvar - mu^2 - exp(logvar)) / R``)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1).mean()


class CLIFF(Method):
    """CLIFF's head, losses and recipe (see the module doc)."""

    name = "cliff"
    distills = True

    @property
    def needs_store(self) -> bool:
        """The stored proposal embeddings are the image chain's targets (stages 2 and 3)."""
        return self.cfg.image_chain and self.cfg.rec_weight > 0

    def build_head(self, in_features: int, embed_dim: int, classes: Vocabulary | None = None) -> CLIFFHead:
        if self.cfg.logit_scale is None:
            raise ValueError("method.logit_scale is unset (half the teacher's): calibrate the config with the teacher's "
                             "logit scale first (ovdlab.platform.config.calibrate), or set a number")
        return CLIFFHead(in_features, embed_dim, self.cfg.diffusion_steps, self.cfg.cosine_s)

    # -------------------------------------------------------------- the chain
    def start(self, head_out: dict[str, Tensor], training: bool, generator: torch.Generator | None = None) -> Tensor:
        """``x_T``: the VAE sample (training) or its mean (inference); ``N(0, I)`` without
        object noise (stage 1)."""
        mu, logvar = head_out["mu"], head_out["logvar"]
        if not self.cfg.object_noise:
            return torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        if not training:
            return mu
        return mu + (0.5 * logvar).exp() * torch.randn_like(mu)

    def image(self, head: CLIFFHead, x: Tensor, x_start: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Object -> CLIP image space: the first ``image_steps`` reverse steps conditioned on ``x``."""
        steps = range(self.cfg.diffusion_steps - 1, self.cfg.diffusion_steps - 1 - self.cfg.image_steps, -1)
        return sample(head.diffuser, head.schedule, x_start, x, steps, generator)[1]

    def condition(self, head: CLIFFHead, x: Tensor, x_start: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The text generation's condition: ``x``, gated by the generated image embedding
        when the image chain is on."""
        if not self.cfg.image_chain:
            return x
        return torch.sigmoid(head.gate(self.image(head, x, x_start, generator))) * x

    def generate(self, head: CLIFFHead, head_out: dict[str, Tensor], training: bool,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(g, x_T, cond)``: the text-space embedding after the full reverse chain."""
        x_start = self.start(head_out, training, generator)
        cond = self.condition(head, head_out["object"], x_start, generator)
        steps = range(self.cfg.diffusion_steps - 1, -1, -1)
        return sample(head.diffuser, head.schedule, x_start, cond, steps, generator)[0], x_start, cond

    def cosine_logits(self, generated: Tensor, vocab: Vocabulary) -> Tensor:
        """``[R, 1 + C]``: a zero background column, then ``s cos(g, t_c)``."""
        text = F.normalize(vocab.embeddings, dim=-1).to(generated.dtype)
        cos = F.normalize(generated, dim=-1) @ text.t() * self.cfg.logit_scale
        return torch.cat([torch.zeros_like(cos[:, :1]), cos], dim=1)

    # ---------------------------------------------------------- Method hooks
    def logits(self, head: nn.Module, head_out: dict[str, Tensor], vocab: Vocabulary) -> Tensor:
        generated = self.generate(head, head_out, training=False)[0]  # type: ignore[arg-type]
        return self.cosine_logits(generated, vocab)

    def losses(
        self,
        head: nn.Module,
        head_out: dict[str, Tensor],
        labels: Tensor,
        vocab: Vocabulary,
        distill: DistillOutputs | None,
    ) -> dict[str, Tensor]:
        generated, x_start, cond = self.generate(head, head_out, training=True)  # type: ignore[arg-type]
        logits = self.cosine_logits(generated.float(), vocab)[:, 1:]
        onehot = F.one_hot(labels, vocab.size + 1)[:, 1:].to(logits.dtype)
        loss_cls = F.binary_cross_entropy_with_logits(logits, onehot, reduction="sum") / max(len(labels), 1)
        return {
            "loss_cls": loss_cls,
            "loss_gen": self.cfg.gen_weight * self.generation_loss(head, labels, vocab, x_start, cond),  # type: ignore[arg-type]
            "loss_kl": self.cfg.kl_weight * self.kl_loss(head, head_out),  # type: ignore[arg-type]
            "loss_rec": self.cfg.rec_weight * self.reconstruction_loss(head, head_out, distill),  # type: ignore[arg-type]
        }

    def kl_loss(self, head: CLIFFHead, head_out: dict[str, Tensor]) -> Tensor:
        """:func:`kl_divergence` of the VAE layer; without object noise (stage 1) a zero that
        keeps the layer in the graph (DDP expects a gradient for every parameter)."""
        if not self.cfg.object_noise:
            return anchor_to_graph(head_out["mu"], head_out["logvar"])
        return kl_divergence(head_out["mu"].float(), head_out["logvar"].float())

    def generation_loss(self, head: CLIFFHead, labels: Tensor, vocab: Vocabulary, noise: Tensor, cond: Tensor) -> Tensor:
        """Noise prediction with ``x0`` = the label's text embedding (zero for background)
        and the noise = the region's own ``x_T``: L1 at one random step per region, or
        (``gen_loss: mse-all-steps``, stage 1) MSE over every step of every region."""
        text = F.normalize(vocab.embeddings, dim=-1).to(noise.dtype)
        x0 = torch.cat([torch.zeros_like(text[:1]), text])[labels]
        target = noise.detach()
        steps = self.cfg.diffusion_steps
        if self.cfg.gen_loss == "mse-all-steps":
            t = torch.arange(steps, device=labels.device).repeat_interleave(len(labels))
            x0, target, cond = x0.repeat(steps, 1), target.repeat(steps, 1), cond.repeat(steps, 1)
            eps = head.diffuser(head.schedule.q_sample(x0, t, target), t, cond)
            return F.mse_loss(eps.float(), target.float())
        t = torch.randint(0, steps, (len(labels),), device=labels.device)
        eps = head.diffuser(head.schedule.q_sample(x0, t, target), t, cond)
        return F.l1_loss(eps.float(), target.float())

    def reconstruction_loss(self, head: CLIFFHead, head_out: dict[str, Tensor], distill: DistillOutputs | None) -> Tensor:
        """Mean L1 between the normalized image-chain output on the stored proposals and the
        teacher's normalized embeddings of them; a zero in the graph when there are none or
        the image chain is off (stage 1: the gate stays connected for DDP)."""
        if not self.cfg.image_chain or distill is None or distill.num_boxes == 0:
            anchors = [head_out["object"], *head.gate.parameters()]
            if distill is not None:
                anchors.append(distill.head_out["object"])
            return anchor_to_graph(*anchors)
        x_start = self.start(distill.head_out, training=True)
        image = self.image(head, distill.head_out["object"], x_start)
        return F.l1_loss(F.normalize(image.float(), dim=-1), F.normalize(distill.targets.float(), dim=-1))

    def scores(
        self, head: nn.Module, head_out: dict[str, Tensor], vocab: Vocabulary, regions: RegionContext | None = None
    ) -> Tensor:
        """``sigmoid(s cos(g, t_c))``, ``g`` sampled from ``x_T = mu`` with the seeded generator."""
        generator = regions.generator if regions is not None else None
        generated = self.generate(head, head_out, training=False, generator=generator)[0]  # type: ignore[arg-type]
        return torch.sigmoid(self.cosine_logits(generated.float(), vocab)[:, 1:])

    def recipe(self, cfg: ExperimentConfig) -> list[Stage]:
        """[proposal detector] -> [store] -> stage 1 (object -> text) -> stage 2 (object -> image -> text)
        -> stage 3 (the same at ``final_lr_factor`` x LR, ``final_rec_weight``) -> evaluation
        over ``eval.seeds``.

        The phases share ``train.max_iter`` by ``method.stage_split`` (:func:`phase_lengths`),
        each decays its LR x ``train.gamma`` at the fractions ``method.phase_steps`` of its
        length (the reference's 60k/80k of 90k, 240k/320k of 360k, 60k/80k of 120k), warms up
        in the first only, and starts from the previous phase's final weights. Stage 1 runs
        without object noise or image chain, with the all-steps MSE generation loss. With
        RPN proposals and no ``proposals.checkpoint``, the class-agnostic proposals that
        stages 2 and 3 distill come from ViLD-text's training of the same dataset (a
        detector that never saw a novel box), as in ViLD's recipe.
        """
        reads: dict[str, str] = {}
        stages: list[Stage] = []
        if cfg.proposals.source == "rpn" and cfg.proposals.checkpoint is None:
            stages.append(Stage("proposal-detector", "train", experiment=f"experiments/vild_text_{cfg.dataset.kind}"))
            reads = {"proposals.checkpoint": "proposal-detector"}
        lengths = phase_lengths(cfg.train.max_iter, cfg.method.stage_split)
        first, second, third = (phase_schedule(n, fractions) for n, fractions in zip(lengths, cfg.method.phase_steps))
        return [
            *stages,
            *self.store_stages(reads),
            Stage("obj-txt", "train", reads=reads,
                  overrides=("method.image_chain=false", "method.object_noise=false", "method.gen_loss=mse-all-steps",
                             *first)),
            Stage("obj-img-txt", "train", reads={**reads, "train.init_from": "obj-txt"},
                  overrides=(*second, "train.warmup_iters=0")),
            Stage("final", "train", reads={**reads, "train.init_from": "obj-img-txt"},
                  overrides=(*third, "train.warmup_iters=0", f"method.rec_weight={cfg.method.final_rec_weight:g}",
                             f"train.lr={cfg.train.lr * cfg.method.final_lr_factor:g}")),
            Stage("eval", "eval"),
        ]


def phase_lengths(total: int, split: list[float]) -> tuple[int, int, int]:
    """``total`` steps shared by the phases in proportion to ``split``, at least one each
    (570k = 90k + 360k + 120k for the paper's 3 : 12 : 4); the last phase takes what the
    rounding of the first two left, so that they add up to ``total``."""
    weight = sum(split)
    first, second = (max(1, round(total * part / weight)) for part in split[:2])
    return first, second, max(1, total - first - second)


def phase_schedule(length: int, fractions: list[float]) -> tuple[str, str]:
    """A phase's ``train.max_iter`` and ``train.steps`` overrides: LR drops at ``fractions``
    of its ``length`` (steps that round to 0 or past the end are left out)."""
    steps = sorted({round(length * f) for f in fractions if 0 < round(length * f) < length})
    return f"train.max_iter={length}", f"train.steps=[{', '.join(map(str, steps))}]"

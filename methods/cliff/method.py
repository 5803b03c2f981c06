"""CLIFF's RoI head, losses and three-phase recipe (methods.md, "CLIFF").

With ``h_r`` the box-head feature of region ``r`` (R50-C4: the mean-pooled res5 output)
and ``t_c`` the normalized text embedding of class ``c``:

- Object feature ``x_r = W h_r`` (``D``, the CLIP width); class-agnostic box regression
  stays the platform's.
- Object-centric noise: a VAE layer ``x_r -> (mu_r, log var_r)``; the diffusion starts from
  its sample ``z_r = mu_r + sigma_r eps`` (``mu_r`` at test time), and
  ``L_kl = 1/(R D) sum 1/2 (mu^2 + sigma^2 - 1 - log sigma^2)``.
- Object -> image (stages 2 and 3): the first ``image_steps`` reverse steps of the image
  diffuser from ``z_r`` conditioned on ``x_r`` give ``img_r`` (the last clamped ``x0``);
  ``L_rec`` = mean L1 between ``img`` and the teacher's normalized embedding of the
  stored class-agnostic proposals. The text condition is gated:
  ``cond_r = sigmoid(G img_r) * x_r`` (``G`` starts at zero: a constant 1/2 gate, which the
  condition's LayerNorm removes, so stage 2 starts from stage 1's generator).
- Object -> text: all ``T`` reverse steps of the text diffuser from ``z_r`` under
  ``cond_r`` give ``g_r``; logits ``[0, s cos(g_r, t_1), ..., s cos(g_r, t_C)]``
  (``s`` = 50, a zero background column), sigmoid binary cross-entropy against the one-hot
  label (background: all zero), summed over classes, averaged over regions.
- Generation: at a random step ``t`` per region, ``x_t = q(x0 = t_{y_r}, eps = z_r)`` with
  ``t_{y_r}`` the ground-truth class's text embedding (the zero vector for background);
  ``L_gen`` = mean L1 between the predicted and the true noise.

``L = L_cls + gen_weight L_gen + kl_weight L_kl + rec_weight L_rec`` (+ the box loss).
The reference parses the KL and reconstruction weights and never applies them; here they
are applied. Inference samples with the generator the platform seeds from ``eval.seed``:
the same seed gives the same detections.
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
    """Object projection, VAE layer, gate, the image and text diffusers and their schedule."""

    def __init__(self, in_features: int, embed_dim: int, steps: int, cosine_s: float) -> None:
        super().__init__()
        self.object = nn.Linear(in_features, embed_dim)
        self.vae = nn.Linear(embed_dim, 2 * embed_dim)
        self.gate = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.image_diffuser = Diffuser(embed_dim)
        self.text_diffuser = Diffuser(embed_dim)
        self.schedule = CosineSchedule(steps, cosine_s)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        x = self.object(features)
        mu, logvar = self.vae(x).chunk(2, dim=-1)
        return {"object": x, "mu": mu, "logvar": logvar.clamp(*LOGVAR_RANGE)}


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mu, sigma^2) || N(0, I))`` per dimension, averaged over rows and dimensions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()


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
    def start(self, head_out: dict[str, Tensor], training: bool) -> Tensor:
        """``x_T``: the VAE sample (training) or its mean (inference)."""
        mu, logvar = head_out["mu"], head_out["logvar"]
        if not training:
            return mu
        return mu + (0.5 * logvar).exp() * torch.randn_like(mu)

    def image(self, head: CLIFFHead, x: Tensor, x_start: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Object -> CLIP image space: the first ``image_steps`` reverse steps conditioned on ``x``."""
        steps = range(self.cfg.diffusion_steps - 1, self.cfg.diffusion_steps - 1 - self.cfg.image_steps, -1)
        return sample(head.image_diffuser, head.schedule, x_start, x, steps, generator)[1]

    def condition(self, head: CLIFFHead, x: Tensor, x_start: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The text generation's condition: ``x``, gated by the generated image embedding
        when the image chain is on."""
        if not self.cfg.image_chain:
            return x
        return torch.sigmoid(head.gate(self.image(head, x, x_start, generator))) * x

    def generate(self, head: CLIFFHead, head_out: dict[str, Tensor], training: bool,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(g, x_T, cond)``: the text-space embedding after the full reverse chain."""
        x_start = self.start(head_out, training)
        cond = self.condition(head, head_out["object"], x_start, generator)
        steps = range(self.cfg.diffusion_steps - 1, -1, -1)
        return sample(head.text_diffuser, head.schedule, x_start, cond, steps, generator)[0], x_start, cond

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
            "loss_kl": self.cfg.kl_weight * kl_divergence(head_out["mu"].float(), head_out["logvar"].float()),
            "loss_rec": self.cfg.rec_weight * self.reconstruction_loss(head, head_out, distill),  # type: ignore[arg-type]
        }

    def generation_loss(self, head: CLIFFHead, labels: Tensor, vocab: Vocabulary, noise: Tensor, cond: Tensor) -> Tensor:
        """Noise-prediction L1 at one random step per region, ``x0`` = the label's text
        embedding (zero for background), the noise = the region's own ``x_T``."""
        text = F.normalize(vocab.embeddings, dim=-1).to(noise.dtype)
        x0 = torch.cat([torch.zeros_like(text[:1]), text])[labels]
        t = torch.randint(0, self.cfg.diffusion_steps, (len(labels),), device=labels.device)
        target = noise.detach()
        eps = head.text_diffuser(head.schedule.q_sample(x0, t, target), t, cond)
        return F.l1_loss(eps.float(), target.float())

    def reconstruction_loss(self, head: CLIFFHead, head_out: dict[str, Tensor], distill: DistillOutputs | None) -> Tensor:
        """Mean L1 between the image chain's output on the stored proposals and the teacher's
        normalized embeddings of them; a zero in the graph when there are none or the
        image chain is off (stage 1: the image parameters stay connected for DDP)."""
        if not self.cfg.image_chain or distill is None or distill.num_boxes == 0:
            anchors = [head_out["object"], *head.image_diffuser.parameters(), *head.gate.parameters()]
            if distill is not None:
                anchors.append(distill.head_out["object"])
            return anchor_to_graph(*anchors)
        x_start = self.start(distill.head_out, training=True)
        image = self.image(head, distill.head_out["object"], x_start)
        return F.l1_loss(image.float(), F.normalize(distill.targets.float(), dim=-1))

    def scores(
        self, head: nn.Module, head_out: dict[str, Tensor], vocab: Vocabulary, regions: RegionContext | None = None
    ) -> Tensor:
        """``sigmoid(s cos(g, t_c))``, ``g`` sampled from ``x_T = mu`` with the seeded generator."""
        generator = regions.generator if regions is not None else None
        generated = self.generate(head, head_out, training=False, generator=generator)[0]  # type: ignore[arg-type]
        return torch.sigmoid(self.cosine_logits(generated.float(), vocab)[:, 1:])

    def recipe(self, cfg: ExperimentConfig) -> list[Stage]:
        """[proposal detector] -> [store] -> stage 1 (object -> text) -> stage 2 (object -> image -> text)
        -> stage 3 (the same at ``final_lr_factor`` x LR) -> evaluation over ``eval.seeds``.

        The phases share ``train.max_iter`` by ``method.stage_split`` (:func:`phase_lengths`),
        run at a constant LR (warmup in the first only) and start from the previous phase's
        final weights. With
        RPN proposals and no ``proposals.checkpoint``, the class-agnostic proposals that
        stages 2 and 3 distill come from ViLD-text's training of the same dataset (a
        detector that never saw a novel box), as in ViLD's recipe.
        """
        reads: dict[str, str] = {}
        stages: list[Stage] = []
        if cfg.proposals.source == "rpn" and cfg.proposals.checkpoint is None:
            stages.append(Stage("proposal-detector", "train", experiment=f"experiments/vild_text_{cfg.dataset.kind}"))
            reads = {"proposals.checkpoint": "proposal-detector"}
        first, second, third = phase_lengths(cfg.train.max_iter, cfg.method.stage_split)
        return [
            *stages,
            *self.store_stages(reads),
            Stage("obj-txt", "train", reads=reads,
                  overrides=("method.image_chain=false", f"train.max_iter={first}", "train.steps=[]")),
            Stage("obj-img-txt", "train", reads={**reads, "train.init_from": "obj-txt"},
                  overrides=(f"train.max_iter={second}", "train.steps=[]", "train.warmup_iters=0")),
            Stage("final", "train", reads={**reads, "train.init_from": "obj-img-txt"},
                  overrides=(f"train.max_iter={third}", "train.steps=[]", "train.warmup_iters=0",
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

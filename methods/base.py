"""The Method protocol: the part of the RoI head that differs between OVD methods.

The platform's detector (``ovdlab.platform.detector``) owns the backbone, RPN, RoI
pooling, box head and class-agnostic box regression. For every batch of regions it
hands the pooled ``[R, in_features]`` box-head features to the method, which turns them
into embeddings (``build_head`` / ``forward_head``), logits against the vocabulary
(:class:`Vocabulary`: frozen text embeddings and which classes are novel; ``logits``),
training losses (``losses``) and inference probabilities (``scores``).

A method is a plain object, not an ``nn.Module``: its trainable state lives in the
module returned by :meth:`Method.build_head`, which the detector registers as its
``method_head`` so the parameters train, checkpoint and move across devices with the
detector. The method object itself holds only configuration.

Label convention everywhere: ``0`` = background, ``k + 1`` = vocabulary index ``k``;
logits have ``1 + C`` columns with column 0 the background, scores have ``C``.
A head output named ``embedding`` (``[R, D]``), when present, is the region embedding
the detector reports with each detection.

Stages before, between or after training (a proposal detector, retrieval, a probe) are
the method's recipe (:meth:`Method.recipe`), run by ``ovdlab.platform.recipes.runner``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ovdlab.platform.config import ExperimentConfig, MethodConfig
from ovdlab.platform.recipes.stages import Stage


@dataclass(frozen=True)
class Vocabulary:
    """The classes a detector scores: row ``k`` of ``embeddings`` ``[C, D]`` is class ``k``.

    ``is_novel`` ``[C]`` marks the classes the detector never saw a box of (not in its
    training vocabulary): ViLD-ensemble weighs its two heads per kind of class and
    LP-OVOD scores novel classes with its probe, so the mask reaches the method with the
    embeddings. ``names`` are the class names, when known.
    """

    embeddings: Tensor
    is_novel: Tensor
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] == 0:
            raise ValueError(f"vocabulary embeddings must be [C > 0, D], got {tuple(self.embeddings.shape)}")
        if self.is_novel.shape != (self.embeddings.shape[0],) or self.is_novel.dtype != torch.bool:
            raise ValueError(f"is_novel must be a bool tensor [{self.embeddings.shape[0]}], got "
                             f"{self.is_novel.dtype} {tuple(self.is_novel.shape)}")
        if self.names and len(self.names) != self.embeddings.shape[0]:
            raise ValueError(f"{len(self.names)} names for {self.embeddings.shape[0]} embeddings")

    @classmethod
    def trained(cls, embeddings: Tensor, names: Sequence[str] = ()) -> "Vocabulary":
        """Every class trained on (a training vocabulary)."""
        return cls(embeddings, torch.zeros(embeddings.shape[0], dtype=torch.bool, device=embeddings.device), tuple(names))

    @classmethod
    def against(cls, embeddings: Tensor, names: Sequence[str], trained_names: Sequence[str]) -> "Vocabulary":
        """``names`` with ``is_novel`` = not among the classes the detector trained on."""
        trained = set(trained_names)
        novel = torch.tensor([name not in trained for name in names], dtype=torch.bool, device=embeddings.device)
        return cls(embeddings, novel, tuple(names))

    @property
    def size(self) -> int:
        return int(self.embeddings.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "Vocabulary":
        return Vocabulary(self.embeddings.detach().to(device, dtype), self.is_novel.to(device), self.names)


@dataclass(frozen=True)
class RegionContext:
    """What the detector knows of the scored regions besides their features.

    ``objectness`` ``[R]``: the RPN's probability that each proposal is an object (in
    ``[0, 1]``), given at inference; LP-OVOD and Detic multiply it into the class scores.
    None when the regions carry none (ground-truth boxes, distillation boxes).
    ``generator``: the random generator a sampling method draws from at inference,
    seeded from ``eval.seed`` whenever the inference settings are installed, so an
    evaluation is reproducible bit for bit (None: the global generator).
    """

    objectness: Tensor | None = None
    generator: torch.Generator | None = None


@dataclass
class DistillOutputs:
    """Distillation regions of a batch, after the same pooling/box head/method head as RoIs.

    ``head_out`` holds the method head's outputs for the ``M`` distillation boxes of the
    whole batch (images concatenated in order); ``targets`` are the teacher's (CLIP)
    embeddings of those boxes ``[M, D]``, ``weights`` a per-box weight ``[M]`` (1 unless
    the region store carries e.g. a teacher confidence) and ``image_index`` the batch
    index of the image each box came from ``[M]``.
    """

    head_out: dict[str, Tensor]
    targets: Tensor
    weights: Tensor
    image_index: Tensor

    @property
    def num_boxes(self) -> int:
        return int(self.targets.shape[0])


class Method:
    """Base class of every method plugin; subclasses override the abstract hooks.

    ``distills`` tells the detector whether to pool the distillation boxes at all
    (``False`` spares the extra RoI work of methods that ignore them).
    """

    name: str = "method"
    distills: bool = False
    distills_ground_truth: bool = False
    """Whether the region store holds the training split's ground-truth boxes besides
    the configured proposals (EZSD distills both)."""

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg

    @property
    def needs_store(self) -> bool:
        """Whether training reads the region store (stored teacher embeddings of the
        distillation boxes): the platform extracts it before the loop only then."""
        return self.distills and float(getattr(self.cfg, "distill_weight", 0.0)) > 0

    def build_head(self, in_features: int, embed_dim: int, classes: Vocabulary | None = None) -> nn.Module:
        """The trainable classification part: region feature ``[R, in_features]`` -> outputs.

        ``classes`` is the vocabulary the detector is evaluated on (names and which are
        novel; its embeddings may be placeholders): a method with a parameter per class
        (LP-OVOD's prototypes) sizes it from there. None where only the proposer is used.
        """
        raise NotImplementedError(f"{type(self).__name__}.build_head")

    def build_box_head(self, in_features: int, embed_dim: int) -> nn.Module | None:
        """An optional box branch with per-class deltas (EZSD conditions regression on the
        class's text embedding). None (the default) keeps the platform's class-agnostic
        ``Linear(in_features, 4)``, as ViLD regresses, bit for bit."""
        return None

    def box_deltas(self, box_head: nn.Module, features: Tensor, head_out: dict[str, Tensor], vocab: Vocabulary) -> Tensor:
        """``[R, C, 4]`` box deltas of every region for every vocabulary class (box coder
        weights 10, 10, 5, 5); called only when :meth:`build_box_head` returned a module.
        Training regresses the ground-truth class's deltas; inference decodes each class's."""
        raise NotImplementedError(f"{type(self).__name__}.box_deltas")

    def forward_head(self, head: nn.Module, features: Tensor) -> dict[str, Tensor]:
        """Run the head on box-head features; every output is row-aligned with ``features``."""
        return head(features)

    def logits(self, head: nn.Module, head_out: dict[str, Tensor], vocab: Vocabulary) -> Tensor:
        """``[R, 1 + C]`` classification logits against ``vocab``, column 0 = background."""
        raise NotImplementedError(f"{type(self).__name__}.logits")

    def losses(
        self,
        head: nn.Module,
        head_out: dict[str, Tensor],
        labels: Tensor,
        vocab: Vocabulary,
        distill: DistillOutputs | None,
    ) -> dict[str, Tensor]:
        """Training losses of the sampled RoIs (``labels`` [R]) and the distillation regions.

        Entries named ``loss*`` are summed into the loss; any other entry is a diagnostic
        (detach it) that the loop logs as ``train/<name>`` without optimising it.
        """
        raise NotImplementedError(f"{type(self).__name__}.losses")

    def scores(
        self, head: nn.Module, head_out: dict[str, Tensor], vocab: Vocabulary, regions: RegionContext | None = None
    ) -> Tensor:
        """``[R, C]`` per-class probabilities used at inference (no background column);
        ``regions`` carries the proposals' objectness when the detector has it."""
        raise NotImplementedError(f"{type(self).__name__}.scores")

    def recipe(self, cfg: ExperimentConfig) -> list[Stage]:
        """The method's whole job as stages (:mod:`ovdlab.platform.recipes`): by default one
        training phase on the experiment's config, evaluated at its end."""
        return [*self.store_stages({}), Stage("train", "train")]

    def store_stages(self, reads: dict[str, str]) -> list[Stage]:
        """The region store as its own ``extract`` stage, when training reads one.

        Its minutes and MLflow run stand apart, and the trials of a sweep over a method's
        weight or schedule share it (an extract stage's key hashes only what extraction
        reads); the training finds the finished store by its content key. ``reads``: the
        stages it takes its proposals from (``{"proposals.checkpoint": "proposal-detector"}``).
        """
        return [Stage("store", "extract", reads=dict(reads))] if self.needs_store else []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, cfg={self.cfg!r})"


def anchor_to_graph(*tensors: Tensor) -> Tensor:
    """A zero that depends on ``tensors``: a loss with nothing to average stays in the graph.

    Distributed data parallel expects every parameter to receive a gradient each step;
    a batch without distillation boxes must still produce a (zero) loss through the head.
    """
    total = tensors[0].sum() * 0.0
    for tensor in tensors[1:]:
        total = total + tensor.sum() * 0.0
    return total

"""Class-agnostic proposals: the record every source returns and the source protocol.

A proposal source turns one decoded image (with its annotations, for sources that use
them) into boxes in the image's original pixel coordinates (xyxy, continuous: pixel
``i`` covers ``[i, i + 1)``, as in torchvision and detectron2), one score per box
(objectness, or the CLIP proposal score) and optional per-box extra columns (EZSD's
teacher ``confidence``). Sources are cheap to construct and pickle: any model they need
is loaded on first use, so the pipeline can build a source once in the driver and ship
it to its Ray actors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from ovdlab.platform.config import ExperimentConfig
    from ovdlab.platform.data.catalog import OVDDataset

BOX_TOLERANCE = 1.0
"""Pixels a box may overhang its image before it counts as out of the image.

Box coordinates written by other tools are often rounded or computed on a padded
canvas; a sub-pixel overhang is clipped, anything further means the box belongs to
another image size and the image is recorded as a failure.
"""


GROUND_TRUTH_COLUMN = "ground_truth"
"""Extra column of a store that holds ground-truth boxes besides proposals (EZSD): 1 on a
ground-truth row, 0 on a proposal. Training distills every ground-truth row and caps only
the proposals (``train.distill_per_image``), as EZSD's reference concatenates all ground
truth with its fixed proposal subset."""


class BoxError(ValueError):
    """Boxes that cannot be used on their image (out of the image, empty, non-finite)."""


@dataclass
class Proposals:
    """N boxes of one image: ``boxes`` float32 [N, 4] xyxy original pixels, ``scores`` [N].

    ``extras`` are per-box float columns (each [N]) stored next to the embeddings.
    """

    boxes: np.ndarray
    scores: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.extras = {str(k): np.asarray(v, dtype=np.float32).reshape(-1) for k, v in self.extras.items()}
        n = self.boxes.shape[0]
        if self.scores.shape[0] != n:
            raise ValueError(f"{n} boxes but {self.scores.shape[0]} scores")
        for name, values in self.extras.items():
            if values.shape[0] != n:
                raise ValueError(f"{n} boxes but extra column {name!r} has {values.shape[0]} values")

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls, extra_names: Sequence[str] = ()) -> "Proposals":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), {k: np.zeros(0, np.float32) for k in extra_names})

    def select(self, index: np.ndarray | Sequence[int]) -> "Proposals":
        """The proposals at ``index`` (indices or a boolean mask), in that order."""
        idx = np.asarray(index)
        return Proposals(self.boxes[idx], self.scores[idx], {k: v[idx] for k, v in self.extras.items()})

    def top_k(self, k: int) -> "Proposals":
        """The ``k`` highest-scoring proposals, best first (stable for equal scores)."""
        order = np.argsort(-self.scores, kind="stable")[:k]
        return self.select(order)


@runtime_checkable
class ProposalSource(Protocol):
    """Makes the proposals of one image.

    ``name`` is the config's ``proposals.source``; ``extra_names`` lists the extra
    columns every :class:`Proposals` it returns carries (the store declares them up
    front); ``fingerprint`` is what, beyond the config, determines the output (a file
    digest), for the stage's content key; ``needs_accelerator`` says whether the source
    runs a model (its Ray actors then get the configured GPUs).
    """

    name: str
    extra_names: tuple[str, ...]
    needs_accelerator: bool

    def fingerprint(self) -> dict[str, Any]: ...

    def propose(self, image: np.ndarray, image_id: int, annotations: list[dict[str, Any]]) -> Proposals: ...


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]``."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def fit_to_image(proposals: Proposals, height: int, width: int, tolerance: float = BOX_TOLERANCE) -> Proposals:
    """Clip boxes overhanging the image by at most ``tolerance`` pixels; reject the rest.

    Raises :class:`BoxError` naming the first bad box (its row) and the image size for a
    non-finite box, a box with zero or negative area, or a box reaching more than
    ``tolerance`` beyond the image: such a box means the proposals were made for another
    image (or scale), and embedding a clipped sliver of it would store a wrong region.
    """
    boxes = proposals.boxes
    if not len(proposals):
        return proposals
    finite = np.isfinite(boxes).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise BoxError(f"box {row} {boxes[row].tolist()} is not finite")
    empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise BoxError(f"box {row} {boxes[row].tolist()} has zero or negative area")
    outside = (
        (boxes[:, 0] < -tolerance)
        | (boxes[:, 1] < -tolerance)
        | (boxes[:, 2] > width + tolerance)
        | (boxes[:, 3] > height + tolerance)
    )
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        raise BoxError(f"box {row} {boxes[row].tolist()} lies outside the {width}x{height} image")
    clipped = boxes.copy()
    clipped[:, 0::2] = np.clip(clipped[:, 0::2], 0, width)
    clipped[:, 1::2] = np.clip(clipped[:, 1::2], 0, height)
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise BoxError(f"box {row} {boxes[row].tolist()} has no area inside the {width}x{height} image")
    return Proposals(clipped, proposals.scores, proposals.extras)


def build_proposal_source(
    cfg: "ExperimentConfig", dataset: "OVDDataset", *, embed_dim: int | None = None, device: str = "cpu"
) -> ProposalSource:
    """The source ``cfg.proposals.source`` names, for images of ``dataset``.

    ``embed_dim`` (the teacher's) is needed by ``rpn`` to build the detector the
    checkpoint was trained as; ``device`` is where model-based sources run.
    Imported files are read and validated here, so a bad file fails before any Ray work.
    """
    pcfg = cfg.proposals
    if pcfg.source == "gt":
        from ovdlab.platform.proposals.ground_truth import GroundTruthSource

        return GroundTruthSource()
    if pcfg.source == "file":
        from ovdlab.platform.proposals.imported import ImportedProposalSource

        assert pcfg.file is not None  # the config validator requires it
        return ImportedProposalSource.from_dataset(pcfg.file, dataset, per_image=pcfg.per_image)
    if pcfg.source == "clip":
        from ovdlab.platform.proposals.clip_proposals import ClipProposalSource

        return ClipProposalSource.from_config(cfg, dataset, device=device)
    if pcfg.source == "rpn":
        from ovdlab.platform.proposals.rpn import RPNProposalSource

        if not pcfg.checkpoint:
            raise ValueError(
                "proposals.source 'rpn' needs proposals.checkpoint (a trained detector's checkpoint folder "
                "or state dict file)"
            )
        if embed_dim is None:
            raise ValueError("proposals.source 'rpn' needs embed_dim (the teacher's) to rebuild the detector")
        from ovdlab.platform.train.checkpoint import trained_with

        model_cfg, method_cfg = trained_with(pcfg.checkpoint, cfg)
        return RPNProposalSource(
            pcfg.checkpoint, model_cfg, method_cfg, embed_dim, per_image=pcfg.per_image, device=device
        )
    raise ValueError(f"unknown proposals.source {pcfg.source!r}; choose one of gt, file, clip, rpn")

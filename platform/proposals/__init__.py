"""Class-agnostic proposal sources: ground truth, imported files (OLN), CLIP proposals, detector RPN.

The record type and the torch-free helpers are imported eagerly; the sources that run
models are imported on first access (PEP 562), so a Ray worker that only handles
proposal records does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from ovdlab.platform.proposals.base import (
    BoxError,
    Proposals,
    ProposalSource,
    build_proposal_source,
    fit_to_image,
    xywh_to_xyxy,
)

_LAZY: dict[str, str] = {
    "ClipProposalSource": "clip_proposals",
    "dense_anchors": "clip_proposals",
    "proposal_scores": "clip_proposals",
    "select_proposals": "clip_proposals",
    "GroundTruthSource": "ground_truth",
    "ImportedProposalSource": "imported",
    "ProposalFileError": "imported",
    "RPNProposalSource": "rpn",
}

__all__ = [
    "BoxError",
    "ProposalSource",
    "Proposals",
    "build_proposal_source",
    "fit_to_image",
    "xywh_to_xyxy",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

"""Ground-truth boxes as proposals (EZSD embeds its base GT boxes; analyses and tests).

Every non-crowd annotation of the image becomes one region with score 1. Crowd boxes
(``iscrowd = 1``) cover groups of objects, which is why torchvision's detection
references drop them from training targets; they are left out here too. The catalog
has already clipped the boxes to the image and dropped degenerate ones
(:class:`ovdlab.platform.data.catalog.OVDDataset`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ovdlab.platform.proposals.base import Proposals, xywh_to_xyxy


class GroundTruthSource:
    """Proposals = the image's (non-crowd) annotated boxes, in annotation order."""

    name = "gt"
    extra_names: tuple[str, ...] = ()
    needs_accelerator = False

    def fingerprint(self) -> dict[str, Any]:
        return {}

    def propose(self, image: np.ndarray, image_id: int, annotations: list[dict[str, Any]]) -> Proposals:
        boxes = [a["bbox"] for a in annotations if not a.get("iscrowd", 0)]
        xyxy = xywh_to_xyxy(np.asarray(boxes, dtype=np.float32)) if boxes else np.zeros((0, 4), np.float32)
        return Proposals(xyxy, np.ones(len(xyxy), np.float32))

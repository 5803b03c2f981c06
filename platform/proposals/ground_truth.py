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

from ovdlab.platform.proposals.base import GROUND_TRUTH_COLUMN, Proposals, xywh_to_xyxy


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


class WithGroundTruth:
    """Another source's proposals plus the image's ground-truth boxes (EZSD stage 3).

    EZSD distills the teacher's embeddings of the base ground-truth boxes besides its
    CLIP proposals, the ground truth with weight 1 (Liu, Hu & Nevatia 2023, Sec. 3.4):
    so every ground-truth row gets score 1 and 1 in each extra column (a ``confidence``
    of 1), and the ``ground_truth`` column marks the rows (:data:`GROUND_TRUTH_COLUMN`):
    training distills all of them and caps only the proposals. Ground truth comes first,
    then the inner source's proposals. Its name, extra columns and accelerator needs are the inner source's; the
    fingerprint says the ground truth is included, so the store has its own key.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.extra_names = (*inner.extra_names, GROUND_TRUTH_COLUMN)
        self.needs_accelerator = inner.needs_accelerator

    def fingerprint(self) -> dict[str, Any]:
        return {**self.inner.fingerprint(), "with_ground_truth": GROUND_TRUTH_COLUMN}

    def propose(self, image: np.ndarray, image_id: int, annotations: list[dict[str, Any]]) -> Proposals:
        gt = GroundTruthSource().propose(image, image_id, annotations)
        found = self.inner.propose(image, image_id, annotations)
        ones = np.ones(len(gt), np.float32)
        extras = {name: np.concatenate([ones, found.extras[name]]) for name in self.inner.extra_names}
        extras[GROUND_TRUTH_COLUMN] = np.concatenate([ones, np.zeros(len(found), np.float32)])
        return Proposals(np.concatenate([gt.boxes, found.boxes]), np.concatenate([gt.scores, found.scores]), extras)

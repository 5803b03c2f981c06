"""OVD evaluator: COCO AP50 novel/base/all, LVIS AP/APr/APc/APf, tables and plots.

:func:`evaluate` picks the benchmark protocol by dataset kind (methods.md, "Shared
benchmark definitions"): COCO-format datasets (``coco`` and the synthetic
``shapes``) are scored with one COCOeval run at 100 detections per image, ``lvis``
with LVISEval at 300.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ovdlab.platform.evaluation.coco_eval import SplitMetrics, category_splits, evaluate_coco_ovd
from ovdlab.platform.evaluation.common import ClassAP
from ovdlab.platform.evaluation.lvis_eval import LVISMetrics, evaluate_lvis_ovd
from ovdlab.platform.evaluation.plots import detection_grid, per_class_ap_bar, pr_curves
from ovdlab.platform.evaluation.tables import format_split_table, per_class_csv, summary_line

DatasetKind = Literal["coco", "lvis", "shapes"]
DEFAULT_MAX_DETS: dict[str, int] = {"coco": 100, "shapes": 100, "lvis": 300}


def evaluate(
    kind: DatasetKind, gt: Path | str | dict, results: list[dict] | Path | str, max_dets: int | None = None
) -> SplitMetrics | LVISMetrics:
    """Evaluate ``results`` against ``gt`` with the protocol of dataset ``kind``.

    ``max_dets`` None uses the benchmark's detections per image (100 COCO/shapes,
    300 LVIS).
    """
    if kind not in DEFAULT_MAX_DETS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(DEFAULT_MAX_DETS)}")
    dets = DEFAULT_MAX_DETS[kind] if max_dets is None else max_dets
    if kind == "lvis":
        return evaluate_lvis_ovd(gt, results, max_dets=dets)
    return evaluate_coco_ovd(gt, results, max_dets=dets)


__all__ = [
    "DEFAULT_MAX_DETS",
    "ClassAP",
    "DatasetKind",
    "LVISMetrics",
    "SplitMetrics",
    "category_splits",
    "detection_grid",
    "evaluate",
    "evaluate_coco_ovd",
    "evaluate_lvis_ovd",
    "format_split_table",
    "per_class_ap_bar",
    "per_class_csv",
    "pr_curves",
    "summary_line",
]

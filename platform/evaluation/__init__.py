"""OVD evaluator: COCO AP50 novel/base/all, LVIS AP/APr/APc/APf, tables and plots.

:func:`evaluate` picks the benchmark protocol by dataset kind (methods.md, "Shared
benchmark definitions"): COCO-format datasets (``coco`` and the synthetic
``shapes``) are scored with one COCOeval run at 100 detections per image, ``lvis``
with LVISEval at 300. Kind ``auto`` reads the protocol off the ground truth
(:func:`detect_protocol`), and a kind the ground truth contradicts is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ovdlab.platform.evaluation.coco_eval import SplitMetrics, category_splits, evaluate_coco_ovd
from ovdlab.platform.evaluation.common import ClassAP, load_json_input
from ovdlab.platform.evaluation.lvis_eval import LVISMetrics, evaluate_lvis_ovd
from ovdlab.platform.evaluation.plots import detection_grid, per_class_ap_bar, pr_curves
from ovdlab.platform.evaluation.protocol import AUTO, KIND_PROTOCOL, detect_protocol, resolve_kind
from ovdlab.platform.evaluation.tables import format_split_table, per_class_csv, summary_line

DatasetKind = Literal["coco", "lvis", "shapes"]
DEFAULT_MAX_DETS: dict[str, int] = {"coco": 100, "shapes": 100, "lvis": 300}


def evaluate(
    kind: DatasetKind | Literal["auto"],
    gt: Path | str | dict,
    results: list[dict] | Path | str,
    max_dets: int | None = None,
) -> SplitMetrics | LVISMetrics:
    """Evaluate ``results`` against ``gt`` with the protocol of dataset ``kind``.

    ``kind`` "auto" takes the protocol from the ground truth (:func:`detect_protocol`);
    an explicit kind that contradicts the ground truth's format is refused, as its
    scores would look valid. ``max_dets`` None uses the benchmark's detections per
    image (100 COCO/shapes, 300 LVIS).
    """
    dataset = load_json_input(gt, "ground truth")
    where = f"ground truth {gt}" if isinstance(gt, (str, Path)) else "the ground truth"
    kind = resolve_kind(kind, dataset, where)
    dets = DEFAULT_MAX_DETS[kind] if max_dets is None else max_dets
    if kind == "lvis":
        return evaluate_lvis_ovd(dataset, results, max_dets=dets)
    return evaluate_coco_ovd(dataset, results, max_dets=dets)


__all__ = [
    "AUTO",
    "DEFAULT_MAX_DETS",
    "ClassAP",
    "DatasetKind",
    "KIND_PROTOCOL",
    "LVISMetrics",
    "SplitMetrics",
    "category_splits",
    "detect_protocol",
    "detection_grid",
    "evaluate",
    "evaluate_coco_ovd",
    "evaluate_lvis_ovd",
    "format_split_table",
    "per_class_ap_bar",
    "per_class_csv",
    "pr_curves",
    "resolve_kind",
    "summary_line",
]

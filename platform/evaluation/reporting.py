"""Evaluation results to MLflow: split metrics, per-class tables, plots, detection pictures.

One call logs what the architecture's tracking model lists for an evaluation
(docs/architecture.md, "Tracking model"): the headline metrics (AP50 novel/base/all
for COCO-format datasets, AP/APr/APc/APf for LVIS), the per-class table as text and
CSV, a per-class AP bar chart with novel classes in their own colour, precision-recall
curves per split and, given images and their detections, a grid of detection pictures
with base and novel classes in different colours. Artifacts go under ``eval/``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ovdlab.platform.config import ExperimentConfig
from ovdlab.platform.evaluation.coco_eval import SplitMetrics
from ovdlab.platform.evaluation.lvis_eval import LVISMetrics
from ovdlab.platform.evaluation.plots import detection_grid, per_class_ap_bar, pr_curves
from ovdlab.platform.evaluation.tables import format_split_table, per_class_csv
from ovdlab.platform.tracking import Tracker, tracker_from_config

Metrics = SplitMetrics | LVISMetrics
ARTIFACT_DIR = "eval"
GRID_COLUMNS = 4
GRID_MIN_SCORE = 0.3
GRID_MAX_BOXES = 20


def grid_detections(
    results: Sequence[Mapping[str, Any]],
    categories: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    min_score: float = GRID_MIN_SCORE,
    max_boxes: int = GRID_MAX_BOXES,
) -> list[list[dict[str, Any]]]:
    """COCO results -> per-image box lists for :func:`detection_grid`, in ``image_ids`` order.

    Evaluation keeps low-scoring detections (they count for AP); a picture shows only
    those at ``min_score`` or above, at most ``max_boxes`` per image, best first.
    """
    names = {int(c["id"]): (str(c["name"]), str(c.get("split", "base"))) for c in categories}
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    wanted = set(int(i) for i in image_ids)
    for det in results:
        image_id = int(det["image_id"])
        if image_id not in wanted or float(det["score"]) < min_score:
            continue
        cat = int(det["category_id"])
        if cat not in names:
            raise ValueError(f"detection on image {image_id} has category_id {cat}, not among the {len(names)} categories")
        name, split = names[cat]
        by_image[image_id].append({"bbox": list(det["bbox"]), "score": float(det["score"]), "name": name, "split": split})
    return [sorted(by_image[int(i)], key=lambda d: -d["score"])[:max_boxes] for i in image_ids]


def _log_all(
    tracker: Tracker,
    metrics: Metrics,
    step: int | None,
    images: Sequence[np.ndarray] | None,
    detections: Sequence[Sequence[dict[str, Any]]] | None,
    titles: Sequence[str] | None,
) -> None:
    tracker.log_metrics(metrics.as_dict(), step=step)
    tracker.log_text(format_split_table(metrics), f"{ARTIFACT_DIR}/per_class_ap.txt")
    tracker.log_text(per_class_csv(metrics), f"{ARTIFACT_DIR}/per_class_ap.csv")
    tracker.log_figure(per_class_ap_bar(metrics), f"{ARTIFACT_DIR}/per_class_ap.png")
    tracker.log_figure(pr_curves(metrics), f"{ARTIFACT_DIR}/pr_curves.png")
    if images:
        grid = detection_grid(images, detections or [[] for _ in images], ncols=GRID_COLUMNS, titles=titles)
        tracker.log_figure(grid, f"{ARTIFACT_DIR}/detections.png")


def log_evaluation(
    cfg: ExperimentConfig,
    metrics: Metrics,
    run_name: str | None = None,
    tracker: Tracker | None = None,
    images: Sequence[np.ndarray] | None = None,
    detections: Sequence[Sequence[dict[str, Any]]] | None = None,
    step: int | None = None,
    titles: Sequence[str] | None = None,
) -> str | None:
    """Log an evaluation; returns the MLflow run id (None when tracking is disabled).

    With a ``tracker`` that has an open run (a training job's), everything goes into
    that run, so a job keeps one run. Otherwise a run named ``run_name`` is opened on
    ``tracker`` (or on the config's tracker) for this evaluation alone, e.g. by
    ``ovdlab eval --log``. ``detections[i]`` are ``images[i]``'s boxes as
    :func:`grid_detections` makes them.
    """
    if images is not None and detections is not None and len(images) != len(detections):
        raise ValueError(f"log_evaluation got {len(images)} images but {len(detections)} detection lists")
    tracker = tracker if tracker is not None else tracker_from_config(cfg)
    if not tracker.enabled:
        return None
    if tracker.active_run_id is not None:
        _log_all(tracker, metrics, step, images, detections, titles)
        return tracker.active_run_id
    tags = {"dataset": cfg.dataset.kind, "kind": "evaluation"}
    with tracker.start_run(run_name=run_name, tags=tags) as run_id:
        _log_all(tracker, metrics, step, images, detections, titles)
    return run_id

"""Evaluation figures: per-class AP bars, PR curves per split, detection pictures.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never through
pyplot, so they work headless on Ray workers whatever the global backend and are not
kept alive by pyplot's figure registry. Every function returns the Figure and, given
``path``, also writes it as a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from torchvision.ops import nms

from ovdlab.platform.evaluation.coco_eval import SplitMetrics
from ovdlab.platform.evaluation.common import SPLITS, ClassAP
from ovdlab.platform.evaluation.lvis_eval import LVISMetrics

Metrics = SplitMetrics | LVISMetrics
SPLIT_COLORS = {"base": "#1f77b4", "novel": "#d62728"}
MAX_TICK_LABELS = 80
PICTURE_OVERLAP = 0.5
"""IoU above which a picture shows only the better-scoring of two boxes (:func:`one_label_per_object`)."""


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, path: Path | str | None) -> Figure:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    return fig


def per_class_ap_bar(
    metrics: Metrics, path: Path | str | None = None, value: Literal["ap50", "ap"] | None = None
) -> Figure:
    """Bar per class, novel classes in a different colour, sorted by split then AP.

    ``value`` defaults to the benchmark's per-class number: AP50 for COCO-OVD, AP
    for LVIS. Classes without ground truth get no bar and an "(no gt)" label.
    """
    value = value or ("ap" if isinstance(metrics, LVISMetrics) else "ap50")
    rows = sorted(
        metrics.per_class,
        key=lambda c: (
            SPLITS.index(c.split) if c.split in SPLITS else len(SPLITS),
            -np.nan_to_num(getattr(c, value), nan=-1.0),
            c.category_id,
        ),
    )
    n = len(rows)
    fig = _new_figure(min(max(6.0, 0.28 * n + 1.5), 40.0), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    heights = [0.0 if math.isnan(getattr(c, value)) else getattr(c, value) for c in rows]
    ax.bar(range(n), heights, color=[SPLIT_COLORS.get(c.split, "gray") for c in rows], width=0.8)
    if n <= MAX_TICK_LABELS:
        labels = [c.name + (" (no gt)" if math.isnan(getattr(c, value)) else "") for c in rows]
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{n} classes")
    ax.set_ylim(0, 100)
    ax.set_ylabel("AP50 (%)" if value == "ap50" else "AP (%)")
    ax.legend(handles=[Patch(color=SPLIT_COLORS[s], label=s) for s in SPLITS], loc="upper right")
    ax.set_title(f"Per-class {'AP50' if value == 'ap50' else 'AP'}")
    fig.tight_layout()
    return _finish(fig, path)


def pr_curves(metrics: Metrics, path: Path | str | None = None) -> Figure:
    """Precision-recall at IoU 0.5, one panel per split: thin line per class, bold mean.

    The curves are the interpolated precision COCOeval/LVISEval stored for the run
    (``metrics.pr``); the mean over a split's classes integrates to its AP50.
    """
    if not metrics.pr:
        raise ValueError("metrics carry no precision curves (metrics.pr is empty)")
    recall = metrics.recall_thresholds
    splits = [s for s in SPLITS if any(c.split == s for c in metrics.per_class)]
    fig = _new_figure(5.0 * len(splits), 4.2)
    for i, split in enumerate(splits, start=1):
        ax = fig.add_subplot(1, len(splits), i)
        classes: list[ClassAP] = [c for c in metrics.per_class if c.split == split and c.category_id in metrics.pr]
        curves = [metrics.pr[c.category_id] for c in classes if not np.all(np.isnan(metrics.pr[c.category_id]))]
        for curve in curves:
            ax.plot(recall, curve, color=SPLIT_COLORS[split], alpha=0.25, linewidth=0.8)
        if curves:
            mean = np.mean(np.stack(curves), axis=0)
            ax.plot(recall, mean, color=SPLIT_COLORS[split], linewidth=2.5, label=f"mean, AP50 {100 * mean.mean():.1f}")
            ax.legend(loc="lower left")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"{split}: {len(curves)} classes with gt")
    fig.tight_layout()
    return _finish(fig, path)


def _check_image(img: Any, index: int) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image {index} must be an HxWx3 uint8 array, got shape {arr.shape} dtype {arr.dtype}")
    return arr


def one_label_per_object(boxes_xyxy: Sequence[Sequence[float]], scores: Sequence[float], overlap: float = PICTURE_OVERLAP) -> list[int]:
    """Indices of the boxes a picture shows, best first: per object only its best label.

    Evaluation's NMS is per class, so one object keeps a box for every class that scored
    on it; drawn together the labels cover each other. A box overlapping a better-scoring
    shown box by IoU > ``overlap`` is left out of the picture (never out of the results).
    """
    if len(boxes_xyxy) == 0:
        return []
    keep = nms(torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores, dtype=torch.float32), overlap)
    return [int(i) for i in keep]


def detection_grid(
    images: Sequence[np.ndarray],
    detections: Sequence[Sequence[dict[str, Any]]],
    ncols: int = 4,
    path: Path | str | None = None,
    titles: Sequence[str] | None = None,
) -> Figure:
    """Images in a grid with their detections, base and novel in different colours.

    ``detections[i]`` are image i's boxes as dicts with ``bbox`` (xywh, pixels),
    ``score``, ``name`` and ``split``; each box is labelled "name score". Each object
    shows its best label (:func:`one_label_per_object`), drawn last, on top.
    """
    if len(images) != len(detections):
        raise ValueError(f"detection_grid got {len(images)} images but {len(detections)} detection lists")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"detection_grid got {len(images)} images but {len(titles)} titles")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    arrays = [_check_image(img, i) for i, img in enumerate(images)]
    n = max(len(arrays), 1)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(3.2 * ncols, 3.2 * nrows + 0.4)
    for i, (img, dets) in enumerate(zip(arrays, detections)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(img)
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
        for j, det in enumerate(dets):
            missing = [k for k in ("bbox", "score", "name", "split") if k not in det]
            if missing:
                raise ValueError(f"detection {j} of image {i} has no {', '.join(missing)}")
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in ([float(v) for v in d["bbox"]] for d in dets)]
        for j in reversed(one_label_per_object(xyxy, [float(d["score"]) for d in dets])):
            det = dets[j]
            x, y, w, h = (float(v) for v in det["bbox"])
            color = SPLIT_COLORS.get(det["split"], "gray")
            ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=color, linewidth=1.5))
            ax.text(
                x, y, f"{det['name']} {float(det['score']):.2f}", color="white", fontsize=6, va="bottom",
                bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "edgecolor": "none"}, clip_on=True,
            )
    fig.legend(handles=[Patch(color=SPLIT_COLORS[s], label=s) for s in SPLITS], loc="lower center", ncol=len(SPLITS))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _finish(fig, path)


def sweep_curve(points: Sequence[tuple[Any, float, bool]], key: str, metric: str, path: Path | str | None = None) -> Figure:
    """A sweep's ``metric`` against the swept ``key``: one marker per trial (``(value,
    metric, completed)``), filled when the trial completed, hollow when it was stopped
    early (its last evaluation); the completed trials' mean per value joined by a line."""
    fig = _new_figure(5.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _, _ in points)
    order = sorted({v for v, _, _ in points}, key=lambda v: v if numeric else str(v))
    x = (lambda v: v) if numeric else (lambda v: order.index(v))
    for value, score, completed in points:
        ax.plot([x(value)], [score], "o", color=SPLIT_COLORS["novel"], fillstyle="full" if completed else "none", ms=7)
    means = [(x(v), float(np.mean([s for w, s, c in points if w == v and c]))) for v in order
             if any(w == v and c for w, _, c in points)]
    if means:
        ax.plot([m[0] for m in means], [m[1] for m in means], "-", color=SPLIT_COLORS["novel"], alpha=0.5)
    if not numeric:
        ax.set_xticks(range(len(order)), [str(v) for v in order])
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against {key} (hollow: stopped early)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _finish(fig, path)


def novel_vs_base(rows: Sequence[tuple[str, float, float, float, float]], path: Path | str | None = None,
                  ylabel: str = "AP50 novel", xlabel: str = "AP50 base") -> Figure:
    """One point per method at (base, novel) with error bars of their spread over seeds:
    ``rows`` of ``(method, base, base_std, novel, novel_std)`` (NaN std: one seed, no bar)."""
    fig = _new_figure(5.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for name, base, base_std, novel, novel_std in rows:
        ax.errorbar([base], [novel], xerr=None if math.isnan(base_std) else [base_std],
                    yerr=None if math.isnan(novel_std) else [novel_std], fmt="o", capsize=3, label=name)
        ax.annotate(name, (base, novel), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("methods: mean ± std over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _finish(fig, path)

"""Plain-text and CSV per-class AP tables (logged as run artifacts).

Rows are grouped novel first, then base, each by category id, so the classes a
method is judged on come first. Undefined AP (no ground truth) prints as ``n/a`` in
the text table and ``nan`` in the CSV.
"""

from __future__ import annotations

import csv
import io
import math

from ovdlab.platform.evaluation.coco_eval import SplitMetrics
from ovdlab.platform.evaluation.common import SPLITS, ClassAP
from ovdlab.platform.evaluation.lvis_eval import LVISMetrics

Metrics = SplitMetrics | LVISMetrics
CSV_COLUMNS = ("category_id", "name", "split", "frequency", "ap50", "ap", "num_gt", "num_dets")


def _ordered(per_class: list[ClassAP]) -> list[ClassAP]:
    return sorted(per_class, key=lambda c: (SPLITS.index(c.split) if c.split in SPLITS else len(SPLITS), c.category_id))


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}"


def headline(metrics: dict[str, float]) -> str:
    """``AP50 novel .. | base .. | all ..`` and the novel kinds (COCO protocol), or
    ``AP .. | APr .. | APc .. | APf ..`` (LVIS), from a metrics dict (as a training
    reports it and the jobs print it)."""
    if "ap50_novel" not in metrics:
        keys = (("ap", "AP"), ("apr", "APr"), ("apc", "APc"), ("apf", "APf"))
        return " | ".join(f"{name} {_fmt(metrics[key])}" for key, name in keys if key in metrics) + _spread(metrics, keys)
    kinds = "".join(f" | {k[len('ap50_'):]} {metrics[k]:.1f}" for k in ("ap50_novel_comp", "ap50_novel_concept") if k in metrics)
    line = f"AP50 novel {metrics['ap50_novel']:.1f} | base {metrics['ap50_base']:.1f} | all {metrics['ap50_all']:.1f}{kinds}"
    return line + _spread(metrics, (("ap50_novel", "novel"), ("ap50_base", "base"), ("ap50_all", "all")))


def _spread(metrics: dict[str, float], keys: tuple[tuple[str, str], ...]) -> str:
    """`` (std over sampling seeds: novel 0.4, ...)`` when an evaluation over seeds gave ``<key>_std``."""
    spread = [f"{name} {_fmt(metrics[f'{key}_std'])}" for key, name in keys if f"{key}_std" in metrics]
    return f" (std over sampling seeds: {', '.join(spread)})" if spread else ""


def summary_line(metrics: Metrics) -> str:
    """One line with the headline numbers and how many classes had no ground truth."""
    if isinstance(metrics, LVISMetrics):
        head = f"AP {_fmt(metrics.ap)} | APr {_fmt(metrics.apr)} | APc {_fmt(metrics.apc)} | APf {_fmt(metrics.apf)}"
    else:
        head = (
            f"AP50 novel {_fmt(metrics.ap50_novel)} | base {_fmt(metrics.ap50_base)} | "
            f"all {_fmt(metrics.ap50_all)} | AP {_fmt(metrics.ap)}"
        )
        head += "".join(f" | novel_{kind} {_fmt(value)}" for kind, value in metrics.novel_kinds.items())
        if not math.isnan(metrics.base_named_novel):
            head += f" | base objects named novel {_fmt(metrics.base_named_novel)}%"
    counts = {s: sum(c.split == s for c in metrics.per_class) for s in SPLITS}
    tail = f"{len(metrics.per_class)} classes ({counts['novel']} novel, {counts['base']} base), {metrics.max_dets} dets/image"
    if metrics.classes_without_gt:
        names = {c.category_id: c.name for c in metrics.per_class}
        missing = ", ".join(names[i] for i in metrics.classes_without_gt)
        tail += f"; no ground truth (excluded): {missing}"
    return f"{head}  [{tail}]"


def format_split_table(metrics: Metrics) -> str:
    """Summary line, then one row per class: id, name, split (and LVIS frequency), AP50, AP, counts."""
    lvis = isinstance(metrics, LVISMetrics)
    header = ["id", "name", "split"] + (["freq"] if lvis else []) + ["AP50", "AP", "#gt", "#dets"]
    rows = [
        [str(c.category_id), c.name, c.split]
        + ([c.frequency or ""] if lvis else [])
        + [_fmt(c.ap50), _fmt(c.ap), str(c.num_gt), str(c.num_dets)]
        for c in _ordered(metrics.per_class)
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    text_cols = {1, 2, 3} if lvis else {1, 2}

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in text_cols else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([summary_line(metrics), "", line(header), rule, *(line(r) for r in rows)]) + "\n"


def per_class_csv(metrics: Metrics) -> str:
    """The per-class table as CSV (header ``CSV_COLUMNS``; frequency empty for COCO)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for c in _ordered(metrics.per_class):
        writer.writerow([c.category_id, c.name, c.split, c.frequency or "", repr(c.ap50), repr(c.ap), c.num_gt, c.num_dets])
    return buf.getvalue()


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN when fewer than two values) of the finite values."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def format_comparison(runs: dict[str, list[dict[str, float]]], columns: dict[str, str]) -> str:
    """A markdown table, one row per method: ``mean ± std`` over its runs (seeds) of each column.

    ``runs`` maps a method to one metrics dict per run; ``columns`` maps a metric key to
    its header. The spread is the sample standard deviation over the runs; a difference
    between two rows smaller than their spreads is no difference.
    """
    header = ["method", "runs", *columns.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, rows in runs.items():
        cells = [method, str(len(rows))]
        for key in columns:
            mean, std = mean_std([float(r.get(key, float("nan"))) for r in rows])
            cells.append(_fmt(mean) + ("" if math.isnan(std) else f" ± {std:.1f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

"""Evaluation figures: they render, write PNGs, and colour novel apart from base.

The ground truth carries both COCO-OVD split tags and LVIS fields, so one builder
serves both evaluators."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ovdlab.platform.evaluation import detection_grid, evaluate_coco_ovd, evaluate_lvis_ovd, per_class_ap_bar, pr_curves
from ovdlab.platform.evaluation.plots import SPLIT_COLORS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def small_gt() -> dict:
    cats = [{"id": i, "name": f"k{i}", "split": "novel" if i in (2, 4) else "base", "frequency": "rcf"[i % 3]}
            for i in range(1, 6)]
    images = [{"id": i, "width": 64, "height": 48, "neg_category_ids": [], "not_exhaustive_category_ids": []}
              for i in range(1, 4)]
    anns = []
    for img in images:
        for cat in range(1, 5):  # class 5 has no gt
            x = 4 + 12 * (cat - 1)
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": cat,
                         "bbox": [x, 8.0, 10.0, 20.0], "area": 200.0, "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": cats}


def some_dets(gt: dict) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"image_id": a["image_id"], "category_id": a["category_id"],
             "bbox": [v + rng.normal(0, 2) for v in a["bbox"]], "score": float(rng.uniform())}
            for a in gt["annotations"] if rng.uniform() > 0.3]


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000


def test_per_class_bar_colours_novel_and_writes_png(tmp_path):
    m = evaluate_coco_ovd(small_gt(), some_dets(small_gt()))
    fig = per_class_ap_bar(m, tmp_path / "bars" / "ap.png")
    assert isinstance(fig, Figure)
    assert_png(tmp_path / "bars" / "ap.png")
    bars = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(bars) == len(m.per_class)
    splits = {c.name: c.split for c in m.per_class}
    for bar, label in zip(bars, labels):
        assert to_hex(bar.get_facecolor()) == SPLIT_COLORS[splits[label.removesuffix(" (no gt)")]]
    assert "k5 (no gt)" in labels
    assert labels[0].startswith("k2") or labels[0].startswith("k4")  # novel first


def test_pr_curves_one_panel_per_split(tmp_path):
    m = evaluate_coco_ovd(small_gt(), some_dets(small_gt()))
    fig = pr_curves(m, tmp_path / "pr.png")
    assert_png(tmp_path / "pr.png")
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["novel", "base"]
    novel_mean = fig.axes[0].get_lines()[-1].get_ydata()
    assert 100 * novel_mean.mean() == pytest.approx(m.ap50_novel)


def test_lvis_metrics_plot_too(tmp_path):
    m = evaluate_lvis_ovd(small_gt(), some_dets(small_gt()))
    per_class_ap_bar(m, tmp_path / "lvis_bar.png")
    pr_curves(m, tmp_path / "lvis_pr.png")
    assert_png(tmp_path / "lvis_bar.png")
    assert_png(tmp_path / "lvis_pr.png")


def test_detection_grid_draws_base_and_novel(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8) for _ in range(3)]
    dets = [
        [{"bbox": [4, 8, 10, 20], "score": 0.9, "name": "k1", "split": "base"},
         {"bbox": [20, 8, 10, 20], "score": 0.6, "name": "k2", "split": "novel"},
         {"bbox": [4, 9, 10, 19], "score": 0.5, "name": "k3", "split": "novel"}],  # k1's object, worse label
        [],
        [{"bbox": [30, 10, 12, 12], "score": 0.4, "name": "k4", "split": "novel"}],
    ]
    fig = detection_grid(images, dets, ncols=2, path=tmp_path / "grid.png")
    assert_png(tmp_path / "grid.png")
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 3
    edge = [to_hex(p.get_edgecolor()) for p in image_axes[0].patches]
    # One label per object, the best drawn last (on top).
    assert edge == [SPLIT_COLORS["novel"], SPLIT_COLORS["base"]]
    assert [t.get_text() for t in image_axes[0].texts] == ["k2 0.60", "k1 0.90"]


def test_detection_grid_rejects_bad_input():
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="image 0"):
        detection_grid([np.zeros((8, 8), dtype=np.uint8)], [[]])
    with pytest.raises(ValueError, match="2 images but 1"):
        detection_grid([img, img], [[]])
    with pytest.raises(ValueError, match="split"):
        detection_grid([img], [[{"bbox": [0, 0, 2, 2], "score": 0.5, "name": "x"}]])

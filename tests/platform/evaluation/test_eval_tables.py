"""Per-class tables: text layout and CSV round trip."""

from __future__ import annotations

import csv
import io
import math

from ovdlab.platform.evaluation import evaluate_coco_ovd, evaluate_lvis_ovd, format_split_table, per_class_csv
from ovdlab.platform.evaluation.tables import CSV_COLUMNS


def gt() -> dict:
    cats = [{"id": 1, "name": "cat", "split": "novel", "frequency": "r"},
            {"id": 2, "name": "dog", "split": "base", "frequency": "f"},
            {"id": 3, "name": "emu", "split": "base", "frequency": "c"}]
    images = [{"id": 1, "width": 50, "height": 50, "neg_category_ids": [3], "not_exhaustive_category_ids": []}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100.0, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 20, 10, 10], "area": 100.0, "iscrowd": 0}]
    return {"images": images, "annotations": anns, "categories": cats}


DETS = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}]


def test_text_table_has_summary_and_rows_by_split():
    m = evaluate_coco_ovd(gt(), DETS)
    text = format_split_table(m)
    lines = text.splitlines()
    assert lines[0].startswith("AP50 novel 100.0 | base 0.0 | all 50.0")
    assert "no ground truth (excluded): emu" in lines[0]
    rows = [line.split() for line in lines[4:]]
    assert [r[1:3] for r in rows] == [["cat", "novel"], ["dog", "base"], ["emu", "base"]]
    assert rows[2][3:5] == ["n/a", "n/a"]


def test_lvis_table_shows_frequency():
    text = format_split_table(evaluate_lvis_ovd(gt(), DETS))
    assert text.splitlines()[0].startswith("AP 50.0 | APr 100.0 | APc n/a | APf 0.0")
    assert "freq" in text.splitlines()[2]


def test_csv_round_trip():
    m = evaluate_coco_ovd(gt(), DETS)
    rows = list(csv.DictReader(io.StringIO(per_class_csv(m))))
    assert tuple(rows[0]) == CSV_COLUMNS
    by_id = {int(r["category_id"]): r for r in rows}
    for c in m.per_class:
        r = by_id[c.category_id]
        assert (r["name"], r["split"], int(r["num_gt"]), int(r["num_dets"])) == (c.name, c.split, c.num_gt, c.num_dets)
        assert math.isnan(float(r["ap50"])) if math.isnan(c.ap50) else float(r["ap50"]) == c.ap50


def test_comparison_table_is_mean_and_sample_std_over_runs():
    from ovdlab.platform.evaluation.tables import format_comparison, mean_std

    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    mean, std = mean_std([4.0])
    assert mean == 4.0 and math.isnan(std)
    table = format_comparison(
        {"vild-text": [{"ap50_novel": 10.0, "m": 2.0}, {"ap50_novel": 14.0, "m": 4.0}], "oracle": [{"ap50_novel": 80.0}]},
        {"ap50_novel": "AP50 novel", "m": "train min"},
    )
    lines = table.splitlines()
    assert lines[0] == "| method | runs | AP50 novel | train min |"
    assert lines[2] == "| vild-text | 2 | 12.0 ± 2.8 | 3.0 ± 1.4 |"
    assert lines[3] == "| oracle | 1 | 80.0 | n/a |"

"""LVIS evaluator: APr/APc/APf on hand-made federated ground truth, and LVISEval parity."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from ovdlab.platform.evaluation import LVISMetrics, evaluate, evaluate_lvis_ovd
from ovdlab.platform.evaluation.lvis_eval import _numpy_compat_for_lvis

FREQ = {1: "r", 2: "r", 3: "c", 4: "c", 5: "f", 6: "f", 7: "r"}
# (image, category, box): class 7 is in the vocabulary but has no annotation
GT_BOXES = [
    (1, 1, [10, 10, 40, 40]), (2, 1, [50, 60, 30, 50]),
    (3, 2, [20, 100, 60, 40]),
    (1, 3, [100, 20, 50, 60]),
    (2, 4, [120, 120, 40, 40]), (3, 4, [5, 5, 30, 30]),
    (1, 5, [60, 130, 70, 50]), (3, 5, [110, 40, 60, 60]), (4, 5, [30, 30, 50, 50]),
    (4, 6, [120, 100, 50, 70]),
]
UNVERIFIED = {1: {6}}  # image 1: class 6 neither annotated nor verified absent
NOT_EXHAUSTIVE = {4: [5]}  # image 4: class 5 present but not exhaustively annotated


def make_lvis_gt() -> dict:
    images = []
    for img_id in range(1, 5):
        present = {c for i, c, _ in GT_BOXES if i == img_id}
        neg = sorted(set(FREQ) - present - UNVERIFIED.get(img_id, set()))
        images.append({"id": img_id, "width": 200, "height": 200, "neg_category_ids": neg,
                       "not_exhaustive_category_ids": NOT_EXHAUSTIVE.get(img_id, [])})
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": [float(v) for v in b], "area": float(b[2] * b[3])}
            for k, (i, c, b) in enumerate(GT_BOXES)]
    cats = [{"id": c, "name": f"lvis{c}", "frequency": f} for c, f in FREQ.items()]
    return {"images": images, "annotations": anns, "categories": cats}


def perfect(skip=lambda k, i, c: False) -> list[dict]:
    return [{"image_id": i, "category_id": c, "bbox": [float(v) for v in b], "score": 1.0}
            for k, (i, c, b) in enumerate(GT_BOXES) if not skip(k, i, c)]


def test_perfect_detections_give_100():
    m = evaluate_lvis_ovd(make_lvis_gt(), perfect())
    assert isinstance(m, LVISMetrics)
    assert m.as_dict() == {"ap": 100.0, "apr": 100.0, "apc": 100.0, "apf": 100.0}
    assert m.classes_without_gt == [7]
    row7 = next(c for c in m.per_class if c.category_id == 7)
    assert math.isnan(row7.ap) and row7.split == "novel" and row7.frequency == "r"
    assert {c.category_id: c.split for c in m.per_class} == {
        c: ("novel" if f == "r" else "base") for c, f in FREQ.items()
    }
    assert {c.category_id: c.num_gt for c in m.per_class} == {c: sum(g[1] == c for g in GT_BOXES) for c in FREQ}


def test_missing_every_rare_object():
    m = evaluate_lvis_ovd(make_lvis_gt(), perfect(lambda k, i, c: FREQ[c] == "r"))
    assert (m.apr, m.apc, m.apf) == (0.0, 100.0, 100.0)
    assert m.ap == pytest.approx(100.0 * 4 / 6)  # 6 classes with gt, 4 perfect


def test_half_recall_on_one_rare_class():
    # class 1 has 2 gts; finding one with precision 1 fills recall thresholds 0..0.5: 51 of 101
    m = evaluate_lvis_ovd(make_lvis_gt(), perfect(lambda k, i, c: k == 1))
    row = next(c for c in m.per_class if c.category_id == 1)
    assert row.ap == pytest.approx(100.0 * 51 / 101)
    assert row.ap50 == pytest.approx(100.0 * 51 / 101)
    assert m.apr == pytest.approx((100.0 * 51 / 101 + 100.0) / 2)
    assert (m.apc, m.apf) == (100.0, 100.0)


def test_federated_rules_use_the_image_lists():
    gt = make_lvis_gt()
    far = [180.0, 180.0, 15.0, 15.0]
    unverified_fp = {"image_id": 1, "category_id": 6, "bbox": far, "score": 1.0}
    negative_fp = {"image_id": 2, "category_id": 6, "bbox": far, "score": 1.0}
    not_exhaustive_fp = {"image_id": 4, "category_id": 5, "bbox": far, "score": 1.0}
    exhaustive_fp = {"image_id": 1, "category_id": 5, "bbox": far, "score": 1.0}
    assert evaluate_lvis_ovd(gt, perfect() + [unverified_fp]).apf == 100.0
    assert evaluate_lvis_ovd(gt, perfect() + [not_exhaustive_fp]).apf == 100.0
    assert evaluate_lvis_ovd(gt, perfect() + [negative_fp]).apf < 100.0
    assert evaluate_lvis_ovd(gt, perfect() + [exhaustive_fp]).apf < 100.0


def jittered(seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    dets = []
    for i, c, (x, y, w, h) in GT_BOXES:
        j = rng.normal(0, 0.15, size=4) * [w, h, w, h]
        dets.append({"image_id": i, "category_id": c, "bbox": [x + j[0], y + j[1], w + j[2], h + j[3]],
                     "score": float(rng.uniform(0.2, 1.0))})
    for _ in range(25):
        dets.append({"image_id": int(rng.integers(1, 5)), "category_id": int(rng.integers(1, 8)),
                     "bbox": [*rng.uniform(0, 150, size=2), *rng.uniform(10, 60, size=2)],
                     "score": float(rng.uniform(0.0, 1.0))})
    return dets


@pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")
@pytest.mark.parametrize("seed, max_dets", [(0, 300), (1, 300), (2, 3)])
def test_matches_lvis_eval_run_directly(tmp_path, seed, max_dets):
    from lvis import LVIS, LVISEval, LVISResults

    gt = make_lvis_gt()
    dets = jittered(seed)
    m = evaluate_lvis_ovd(gt, dets, max_dets=max_dets)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    _numpy_compat_for_lvis()  # the installed lvis needs it on numpy >= 1.24
    lvis_gt = LVIS(str(tmp_path / "gt.json"))
    ev = LVISEval(lvis_gt, LVISResults(lvis_gt, copy.deepcopy(dets), max_dets=max_dets), iou_type="bbox")
    ev.run()
    for ours, key in ((m.ap, "AP"), (m.apr, "APr"), (m.apc, "APc"), (m.apf, "APf")):
        assert ours == pytest.approx(100.0 * ev.results[key], abs=1e-9)
    assert 0.0 < m.ap < 100.0


def test_numpy_shim_stays_inside_lvis():
    import lvis.eval

    evaluate_lvis_ovd(make_lvis_gt(), perfect())
    assert lvis.eval.np.float is float
    assert lvis.eval.np.ones(2).sum() == 2.0
    if np.lib.NumpyVersion(np.__version__) >= "1.24.0":
        assert not hasattr(np, "float")


def test_empty_results_give_zeros():
    m = evaluate_lvis_ovd(make_lvis_gt(), [])
    assert m.as_dict() == {"ap": 0.0, "apr": 0.0, "apc": 0.0, "apf": 0.0}


def test_unknown_ids_raise_naming_them():
    gt = make_lvis_gt()
    with pytest.raises(ValueError, match="31337"):
        evaluate_lvis_ovd(gt, perfect() + [{"image_id": 31337, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.1}])
    with pytest.raises(ValueError, match="777"):
        evaluate_lvis_ovd(gt, perfect() + [{"image_id": 1, "category_id": 777, "bbox": [0, 0, 5, 5], "score": 0.1}])


def test_missing_lvis_fields_are_named():
    gt = make_lvis_gt()
    del gt["images"][2]["neg_category_ids"]
    with pytest.raises(ValueError, match=r"image 3 .*neg_category_ids"):
        evaluate_lvis_ovd(gt, [])
    gt = make_lvis_gt()
    del gt["categories"][0]["frequency"]
    with pytest.raises(ValueError, match=r"category 1 .*frequency"):
        evaluate_lvis_ovd(gt, [])


def test_inputs_not_modified_and_dispatch():
    gt, dets = make_lvis_gt(), jittered(3)
    before = copy.deepcopy((gt, dets))
    m = evaluate("lvis", gt, dets)
    assert (gt, dets) == before
    assert isinstance(m, LVISMetrics) and m.max_dets == 300
    assert m.as_dict() == evaluate_lvis_ovd(gt, dets).as_dict()


def test_detect_protocol_reads_lvis_fields():
    from ovdlab.platform.evaluation import detect_protocol

    gt = make_lvis_gt()
    assert detect_protocol(gt) == "lvis"
    only_frequency = {**gt, "images": [{"id": img["id"]} for img in gt["images"]]}
    assert detect_protocol(only_frequency) == "lvis"
    only_lists = {**gt, "categories": [{"id": c["id"], "name": c["name"], "split": "base"} for c in gt["categories"]]}
    assert detect_protocol(only_lists) == "lvis"
    coco = {**only_frequency, "categories": only_lists["categories"]}
    assert detect_protocol(coco) == "coco"


def test_evaluate_refuses_coco_kind_for_lvis_ground_truth():
    gt = make_lvis_gt()
    assert evaluate("auto", gt, perfect()).as_dict() == evaluate("lvis", gt, perfect()).as_dict()
    for kind in ("coco", "shapes"):
        with pytest.raises(ValueError, match=rf"kind '{kind}' .* COCO protocol but the ground truth is LVIS-format "
                                             r"\(categories with 'frequency', images with 'neg_category_ids'"):
            evaluate(kind, gt, perfect())

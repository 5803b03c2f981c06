"""COCO-OVD evaluator against pycocotools run directly, split by split."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovdlab.platform.evaluation import evaluate, evaluate_coco_ovd, format_split_table

NOVEL_IDS = (2, 5)
NO_GT_ID = 6  # a category in the vocabulary with no annotation in the eval images


def make_gt(seed: int = 0, n_images: int = 8, per_image: int = 5) -> dict:
    """Synthetic COCO-OVD gt: 6 categories (2 novel), category 6 never annotated, one crowd box."""
    rng = np.random.default_rng(seed)
    cats = [{"id": i, "name": f"cls{i}", "split": "novel" if i in NOVEL_IDS else "base"} for i in range(1, 7)]
    images = [{"id": 100 + i, "file_name": f"{i}.png", "width": 320, "height": 240} for i in range(n_images)]
    anns = []
    for img in images:
        for _ in range(per_image):
            w, h = rng.uniform(12, 90, size=2)
            x, y = rng.uniform(0, 320 - w), rng.uniform(0, 240 - h)
            cat = int(rng.integers(1, NO_GT_ID))
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": cat,
                         "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0})
    anns[3]["iscrowd"] = 1
    return {"images": images, "annotations": anns, "categories": cats}


def jittered_dets(gt: dict, seed: int, n_false: int = 30, drop: float = 0.2) -> list[dict]:
    """Seeded jitter of the gt boxes (some dropped, some mislabelled) plus random false positives."""
    rng = np.random.default_rng(seed)
    dets = []
    for ann in gt["annotations"]:
        if rng.uniform() < drop:
            continue
        x, y, w, h = ann["bbox"]
        jit = rng.normal(0, 0.12, size=4) * [w, h, w, h]
        cat = ann["category_id"] if rng.uniform() > 0.1 else int(rng.integers(1, 7))
        dets.append({"image_id": ann["image_id"], "category_id": cat,
                     "bbox": [x + jit[0], y + jit[1], max(1.0, w + jit[2]), max(1.0, h + jit[3])],
                     "score": float(rng.uniform(0.3, 1.0))})
    image_ids = [img["id"] for img in gt["images"]]
    for _ in range(n_false):
        w, h = rng.uniform(10, 80, size=2)
        dets.append({"image_id": int(rng.choice(image_ids)), "category_id": int(rng.integers(1, 7)),
                     "bbox": [float(rng.uniform(0, 240)), float(rng.uniform(0, 160)), float(w), float(h)],
                     "score": float(rng.uniform(0.0, 0.9))})
    return dets


def reference(gt: dict, dets: list[dict], cat_ids: list[int] | None, max_dets: int = 100) -> tuple[float, float, float]:
    """pycocotools on its own, restricted to ``cat_ids``: (mean per-class AP50, AP, stats[1]).

    AP is summarize's reduction at ``max_dets``; it is stats[0] only at 100 dets, since
    summarize hard-codes maxDets=100 for stats[0].
    """
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    prec = ev.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, all recalls, all classes, area all, max_dets
    per_class = [float(np.mean(prec[:, k][prec[:, k] > -1])) for k in range(prec.shape[1]) if (prec[:, k] > -1).any()]
    all_ious = ev.eval["precision"][:, :, :, 0, -1]
    ap = float(np.mean(all_ious[all_ious > -1]))
    if max_dets == 100:
        assert ap == ev.stats[0]
    return 100 * float(np.mean(per_class)), 100 * ap, 100 * ev.stats[1]


def split_ids(gt: dict, split: str) -> list[int]:
    return [c["id"] for c in gt["categories"] if c["split"] == split]


def assert_matches_reference(gt: dict, dets: list[dict]) -> None:
    m = evaluate_coco_ovd(gt, dets)
    for split, ours in (("novel", m.ap50_novel), ("base", m.ap50_base)):
        ref_mean, _, ref_stats1 = reference(gt, dets, split_ids(gt, split))
        # every class with gt fills all 101 recall entries, so the per-class mean is stats[1]
        assert ref_mean == pytest.approx(ref_stats1, abs=1e-9)
        assert ours == pytest.approx(ref_mean, abs=1e-9)
    ref_all, ref_ap, ref_ap50 = reference(gt, dets, None)
    assert m.ap50_all == pytest.approx(ref_all, abs=1e-9)
    assert m.ap50_all == pytest.approx(ref_ap50, abs=1e-9)
    assert m.ap == pytest.approx(ref_ap, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_detections_match_pycocotools_per_split(seed):
    gt = make_gt(seed)
    dets = jittered_dets(gt, seed + 10)
    assert_matches_reference(gt, dets)
    m = evaluate_coco_ovd(gt, dets)
    assert 0 < m.ap50_novel < 100 and 0 < m.ap50_base < 100


def test_per_class_table_and_counts():
    gt = make_gt(3)
    dets = jittered_dets(gt, 4)
    m = evaluate_coco_ovd(gt, dets)
    assert [c.category_id for c in m.per_class] == [1, 2, 3, 4, 5, 6]
    assert {c.category_id: c.split for c in m.per_class} == {c["id"]: c["split"] for c in gt["categories"]}
    for c in m.per_class:
        non_crowd = sum(a["category_id"] == c.category_id and not a["iscrowd"] for a in gt["annotations"])
        assert c.num_gt == non_crowd
        assert c.num_dets == sum(d["category_id"] == c.category_id for d in dets)
    novel = [c.ap50 for c in m.per_class if c.split == "novel" and not math.isnan(c.ap50)]
    assert m.ap50_novel == pytest.approx(np.mean(novel))
    assert set(m.pr) == {1, 2, 3, 4, 5, 6}
    assert m.recall_thresholds.shape == (101,)
    for c in m.per_class:
        if not math.isnan(c.ap50):
            assert 100 * m.pr[c.category_id].mean() == pytest.approx(c.ap50)
    assert np.isnan(m.pr[NO_GT_ID]).all()
    assert m.as_dict() == {"ap50_novel": m.ap50_novel, "ap50_base": m.ap50_base, "ap50_all": m.ap50_all, "ap": m.ap,
                           "base_named_novel": m.base_named_novel}


def test_class_without_gt_is_nan_listed_and_excluded():
    gt = make_gt(0)
    dets = jittered_dets(gt, 1) + [
        {"image_id": 100, "category_id": NO_GT_ID, "bbox": [5, 5, 30, 30], "score": 0.99},
    ]
    m = evaluate_coco_ovd(gt, dets)
    row = next(c for c in m.per_class if c.category_id == NO_GT_ID)
    assert math.isnan(row.ap50) and math.isnan(row.ap) and row.num_gt == 0
    assert m.classes_without_gt == [NO_GT_ID]
    assert not math.isnan(m.ap50_base)
    assert_matches_reference(gt, dets)


def test_perfect_detections_give_100():
    gt = make_gt(5)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]
    m = evaluate_coco_ovd(gt, dets)
    assert m.as_dict() == {"ap50_novel": 100.0, "ap50_base": 100.0, "ap50_all": 100.0, "ap": 100.0, "base_named_novel": 0.0}


def test_empty_results_give_zeros():
    gt = make_gt(0)
    m = evaluate_coco_ovd(gt, [])
    assert m.as_dict() == {"ap50_novel": 0.0, "ap50_base": 0.0, "ap50_all": 0.0, "ap": 0.0, "base_named_novel": 0.0}
    assert m.classes_without_gt == [NO_GT_ID]
    assert all(c.num_dets == 0 for c in m.per_class)


def test_class_with_no_detections_scores_zero():
    gt = make_gt(1)
    dets = [d for d in jittered_dets(gt, 2) if d["category_id"] != 2]
    m = evaluate_coco_ovd(gt, dets)
    assert next(c for c in m.per_class if c.category_id == 2).ap50 == 0.0
    assert_matches_reference(gt, dets)


def test_duplicate_boxes_are_false_positives():
    gt = make_gt(2)
    dets = jittered_dets(gt, 3, n_false=0, drop=0.0)
    dupes = dets + [{**d, "score": d["score"] * 0.5} for d in dets] + [dict(d) for d in dets]
    assert_matches_reference(gt, dupes)
    assert evaluate_coco_ovd(gt, dupes).ap50_all < evaluate_coco_ovd(gt, dets).ap50_all


def test_max_dets_keeps_top_scores_per_image_in_any_order():
    gt = make_gt(4, n_images=3, per_image=6)
    dets = jittered_dets(gt, 5, n_false=40, drop=0.0)
    max_dets = 4
    kept = []
    for img in gt["images"]:
        mine = sorted((d for d in dets if d["image_id"] == img["id"]), key=lambda d: -d["score"])
        kept += mine[:max_dets]
    m = evaluate_coco_ovd(gt, dets, max_dets=max_dets)
    ref_all, ref_ap, _ = reference(gt, kept, None, max_dets=max_dets)
    assert m.ap50_all == pytest.approx(ref_all, abs=1e-9)
    assert m.ap == pytest.approx(ref_ap, abs=1e-9)
    assert sum(c.num_dets for c in m.per_class) == len(kept)
    shuffled = [dets[i] for i in np.random.default_rng(0).permutation(len(dets))]
    assert evaluate_coco_ovd(gt, shuffled, max_dets=max_dets).as_dict() == m.as_dict()


def test_unknown_image_id_raises_naming_it():
    gt = make_gt(0)
    dets = jittered_dets(gt, 1) + [{"image_id": 987654, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]
    with pytest.raises(ValueError, match="987654"):
        evaluate_coco_ovd(gt, dets)


def test_unknown_category_id_raises_naming_it():
    gt = make_gt(0)
    dets = jittered_dets(gt, 1) + [{"image_id": 100, "category_id": 4242, "bbox": [0, 0, 5, 5], "score": 0.5}]
    with pytest.raises(ValueError, match="4242"):
        evaluate_coco_ovd(gt, dets)


def test_category_without_split_is_an_error():
    gt = make_gt(0)
    del gt["categories"][2]["split"]
    with pytest.raises(ValueError, match=r"category 3 .*split"):
        evaluate_coco_ovd(gt, [])


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"image_id": 100, "category_id": 1, "bbox": [0, 0, 5], "score": 0.5}, "bbox"),
        ({"image_id": 100, "category_id": 1, "bbox": [0, 0, -5, 5], "score": 0.5}, "bbox"),
        ({"image_id": 100, "category_id": 1, "bbox": [0, 0, 5, 5], "score": float("nan")}, "score"),
        ({"image_id": 100, "category_id": 1, "bbox": [0, 0, 5, 5]}, "score"),
        ({"image_id": "100", "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}, "image_id"),
    ],
)
def test_malformed_results_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        evaluate_coco_ovd(make_gt(0), [bad])


def test_inputs_are_not_modified_and_files_work(tmp_path):
    gt = make_gt(6)
    dets = jittered_dets(gt, 7)
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    m = evaluate_coco_ovd(gt, dets)
    assert gt == gt_before and dets == dets_before
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    from_files = evaluate_coco_ovd(tmp_path / "gt.json", str(tmp_path / "dets.json"))
    assert from_files.as_dict() == pytest.approx(m.as_dict())
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate_coco_ovd(tmp_path / "gt.json", tmp_path / "missing.json")


def test_gt_annotation_ids_from_zero_still_score_perfectly():
    """pycocotools reads matched-gt-id 0 as "unmatched"; the evaluator renumbers gt ids."""
    gt = make_gt(0)
    for i, ann in enumerate(gt["annotations"]):
        ann["id"] = i
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]
    assert evaluate_coco_ovd(gt, dets).ap50_all == 100.0


def test_evaluate_dispatch():
    gt = make_gt(0)
    dets = jittered_dets(gt, 1)
    assert evaluate("shapes", gt, dets).as_dict() == evaluate_coco_ovd(gt, dets, max_dets=100).as_dict()
    assert evaluate("coco", gt, dets).max_dets == 100
    with pytest.raises(ValueError, match="kind"):
        evaluate("voc", gt, dets)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("score", "0.9", r"result 1\.score must be a number, got str '0\.9'"),
        ("score", True, r"result 1\.score must be a number, got bool True"),
        ("bbox", ["0", 0, 5, 5], r"result 1\.bbox\[0\] must be a number, got str '0'"),
        ("bbox", [0, 0, 5, False], r"result 1\.bbox\[3\] must be a number, got bool False"),
        ("bbox", "0 0 5 5", r"result 1\.bbox must be 4 numbers"),
        ("category_id", "1", r"result 1\.category_id must be an integer, got str '1'"),
        ("category_id", True, r"result 1\.category_id must be an integer, got bool True"),
    ],
)
def test_results_hold_numbers_not_strings_or_bools(field, value, match):
    good = {"image_id": 100, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}
    with pytest.raises(ValueError, match=match):
        evaluate_coco_ovd(make_gt(0), [good, {**good, field: value}])


def test_evaluate_refuses_lvis_kind_for_coco_ground_truth(tmp_path):
    gt = make_gt(0)
    dets = jittered_dets(gt, 1)
    assert evaluate("auto", gt, dets).as_dict() == evaluate("coco", gt, dets).as_dict()
    path = tmp_path / "coco_gt.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(ValueError, match=rf"kind 'lvis' .* LVIS protocol but ground truth {path} is COCO-format"):
        evaluate("lvis", path, dets)


def test_pycocotools_prints_stay_silent_under_a_patched_print(monkeypatch):
    """Ray Train V2 patches ``print`` in its workers to log each line; pycocotools' progress
    ("index created!", "DONE (t=...)") reached the driver's console from every evaluation."""
    import builtins

    heard: list[str] = []
    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: heard.append(" ".join(map(str, args))))
    gt = make_gt(5)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]
    assert evaluate_coco_ovd(gt, dets).ap50_all == 100.0
    assert heard == []


def test_novel_kinds_are_scored_apart():
    """Shapes tags novel classes ``comp`` or ``concept``; each kind gets its AP50 mean, the
    same per-class numbers the novel mean is made of."""
    gt = make_gt(2)
    kinds = dict(zip(sorted(NOVEL_IDS), ["comp", "concept"]))
    for cat in gt["categories"]:
        if cat["id"] in kinds:
            cat["novel_kind"] = kinds[cat["id"]]
    m = evaluate_coco_ovd(gt, jittered_dets(gt, 5))
    by_id = {c.category_id: c for c in m.per_class}
    assert m.novel_kinds == {kind: by_id[i].ap50 for i, kind in kinds.items()}
    assert m.as_dict()["ap50_novel_concept"] == by_id[sorted(NOVEL_IDS)[1]].ap50
    assert "novel_comp" in format_split_table(m).splitlines()[0]
    plain = evaluate_coco_ovd(make_gt(2), jittered_dets(make_gt(2), 5))
    assert plain.novel_kinds == {} and set(plain.as_dict()) == {"ap50_novel", "ap50_base", "ap50_all", "ap", "base_named_novel"}


def test_base_objects_a_novel_class_wins_are_counted():
    """A novel class that outscores the base label on a base object costs base AP50 with
    the object found; ``base_named_novel`` counts such objects among all base objects."""
    cats = [{"id": 1, "name": "blue square", "split": "base"}, {"id": 2, "name": "blue star", "split": "novel"}]
    images = [{"id": 1, "file_name": "1.png", "width": 100, "height": 100}]
    boxes = [[0, 0, 20, 20], [40, 0, 20, 20], [0, 40, 20, 20], [40, 40, 20, 20]]
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 400, "iscrowd": 0} for i, b in enumerate(boxes)]
    anns[3]["iscrowd"] = 1
    dets = [
        {"image_id": 1, "category_id": 2, "bbox": [1, 1, 20, 20], "score": 0.9},  # won by the novel class ...
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.2},  # ... the base label lower
        {"image_id": 1, "category_id": 1, "bbox": [40, 0, 20, 20], "score": 0.8},  # base label best
        {"image_id": 1, "category_id": 2, "bbox": [40, 0, 20, 20], "score": 0.3},
        {"image_id": 1, "category_id": 2, "bbox": [10, 40, 20, 20], "score": 0.9},  # IoU 1/3: not this object's
        {"image_id": 1, "category_id": 2, "bbox": [40, 40, 20, 20], "score": 0.9},  # on the crowd box: not counted
    ]
    m = evaluate_coco_ovd({"images": images, "annotations": anns, "categories": cats}, dets)
    assert m.base_named_novel == pytest.approx(100 / 3)
    assert m.as_dict()["base_named_novel"] == m.base_named_novel
    assert "| AP 66.3 | base objects named novel 33.3%  [2 classes" in format_split_table(m).splitlines()[0]
    assert evaluate_coco_ovd({"images": images, "annotations": anns, "categories": cats}, dets[1:4]).base_named_novel == 0.0


def test_tied_top_counts_boxes_whose_best_class_score_is_shared():
    """Two of three boxes tie at the top (a saturated 1.0 pair; an exact 0.4 pair below a
    lone 0.2 would not count, only the best score matters); a single-class box cannot tie."""
    import torch

    from ovdlab.platform.evaluation.common import tied_top_pct

    saturated = float(torch.sigmoid(torch.tensor([50 * 0.34, 50 * 0.9]))[0])
    assert saturated == 1.0 == float(torch.sigmoid(torch.tensor(50 * 0.9)))
    box, other, lone = [1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]
    results = [
        {"image_id": 1, "category_id": 1, "bbox": box, "score": saturated},
        {"image_id": 1, "category_id": 2, "bbox": box, "score": 1.0},
        {"image_id": 1, "category_id": 1, "bbox": other, "score": 0.4},
        {"image_id": 1, "category_id": 2, "bbox": other, "score": 0.4},
        {"image_id": 1, "category_id": 3, "bbox": other, "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": box, "score": 0.7},
    ]
    assert tied_top_pct(results) == pytest.approx(100.0 / 3)
    results[4]["score"] = 0.2
    assert tied_top_pct(results) == pytest.approx(200.0 / 3)
    assert tied_top_pct([]) == 0.0

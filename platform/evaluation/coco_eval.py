"""COCO open-vocabulary evaluation: box AP50 on novel, base and all classes.

The protocol of OVR-CNN / ViLD and every method here (methods.md, "Shared benchmark
definitions"): one pycocotools ``COCOeval`` run over the whole vocabulary (the
generalized setting, all classes compete), per-class AP50 read from its precision
array, then averaged per split. A class without ground truth in the evaluated images
has undefined AP (-1 in pycocotools); it is reported as NaN and left out of the means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovdlab.platform.evaluation.common import (
    per_class_counts,
    SPLITS,
    ClassAP,
    base_named_novel,
    check_gt,
    eval_copy_of_gt,
    load_json_input,
    mean_valid,
    novel_kind_means,
    prepare_results,
    silenced_prints,
    split_mean,
)


@dataclass
class SplitMetrics:
    """COCO-OVD metrics in percent (0-100, as papers report them).

    ``novel_kinds`` holds the AP50 of each kind of novel class when the categories carry
    a ``novel_kind`` tag (shapes: ``comp`` and ``concept``), logged as
    ``ap50_novel_<kind>``. ``classes_without_gt`` lists the category ids whose AP is undefined (NaN in
    ``per_class``, excluded from the means; a split none of whose classes has gt has
    a NaN mean). ``pr`` maps category id -> precision at IoU 0.5 over
    ``recall_thresholds`` (the 101 of COCOeval), kept from the same run for plotting:
    interpolated as COCOeval stores it (max precision at any recall to the right, 0
    past the last recall reached), NaN for classes without gt. ``base_named_novel``:
    the percent of base objects a novel class wins (:func:`~ovdlab.platform.evaluation.common.base_named_novel`),
    what separates base AP50 lost to novel competition from base classes not learned.
    """

    ap50_novel: float
    ap50_base: float
    ap50_all: float
    ap: float
    per_class: list[ClassAP]
    classes_without_gt: list[int] = field(default_factory=list)
    max_dets: int = 100
    novel_kinds: dict[str, float] = field(default_factory=dict)
    base_named_novel: float = float("nan")
    pr: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    recall_thresholds: np.ndarray = field(default_factory=lambda: np.linspace(0.0, 1.0, 101), repr=False, compare=False)

    def as_dict(self) -> dict[str, float]:
        """Flat metric names, as logged to MLflow."""
        out = {"ap50_novel": self.ap50_novel, "ap50_base": self.ap50_base, "ap50_all": self.ap50_all, "ap": self.ap}
        out.update({f"ap50_novel_{kind}": value for kind, value in self.novel_kinds.items()})
        out["base_named_novel"] = self.base_named_novel
        return out


def category_splits(dataset: dict[str, Any]) -> dict[int, str]:
    """``{category_id: "base" | "novel"}`` from the categories' ``split`` tags."""
    splits: dict[int, str] = {}
    for cat in dataset["categories"]:
        split = cat.get("split")
        if split not in SPLITS:
            got = "no 'split' tag" if "split" not in cat else f"split {split!r}"
            raise ValueError(
                f"category {cat['id']} ({cat.get('name', '?')!r}) has {got}; every category of an OVD "
                f"ground truth needs 'split': 'base' or 'novel'"
            )
        splits[int(cat["id"])] = split
    return splits


def _coco_from_dict(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _run_cocoeval(gt: dict[str, Any], dets: list[dict[str, Any]], max_dets: int) -> COCOeval:
    """One COCOeval bbox run with maxDets [1, 10, max_dets]; its printing is discarded.

    ``COCO.loadRes`` fails on an empty list (it reads ``anns[0]``), so no detections
    become an empty results object, which COCOeval scores as AP 0 for every class
    with ground truth.
    """
    with silenced_prints():
        coco_gt = _coco_from_dict(gt)
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:
            coco_dt = _coco_from_dict({"images": list(gt["images"]), "categories": list(gt["categories"]), "annotations": []})
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.maxDets = sorted([1, 10, max_dets])
        ev.evaluate()
        ev.accumulate()
    return ev


def _counts(ev: COCOeval) -> tuple[dict[int, int], dict[int, int]]:
    """Per-class numbers of non-ignored gts and scored detections (area "all")."""
    all_area = ev.params.areaRng[ev.params.areaRngLbl.index("all")]
    return per_class_counts(ev.params.catIds, ev.evalImgs, all_area, "aRng", "gtIgnore", "dtIds")


def evaluate_coco_ovd(gt: Path | str | dict, results: list[dict] | Path | str, max_dets: int = 100) -> SplitMetrics:
    """Box AP50 novel/base/all and COCO AP from one COCOeval run.

    Per-class AP50 is ``precision[IoU=0.5, :, k, area=all, maxDets=max_dets]``
    averaged over the 101 recall thresholds, ignoring -1 entries, exactly the
    reduction of ``COCOeval.summarize``; per-class AP does the same over the ten IoU
    thresholds 0.5:0.95, and ``ap`` is summarize's AP reduction over all classes
    (read from the array: ``stats[0]`` hard-codes maxDets=100). ``gt`` is a
    COCO json (path or dict) whose categories carry ``split``; ``results`` a COCO
    results list or json file. At most ``max_dets`` detections per image are kept,
    the highest-scoring.
    """
    dataset = check_gt(load_json_input(gt, "ground truth"))
    splits = category_splits(dataset)
    image_ids = {int(img["id"]) for img in dataset["images"]}
    dets = prepare_results(results, image_ids, set(splits), max_dets)
    ev = _run_cocoeval(eval_copy_of_gt(dataset), dets, max_dets)

    precision = ev.eval["precision"]  # [T, R, K, A, M]
    p = ev.params
    t50 = int(np.where(p.iouThrs == 0.5)[0][0])
    a_all = p.areaRngLbl.index("all")
    m = p.maxDets.index(max_dets)
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in dataset["categories"]}
    kinds = {int(c["id"]): c.get("novel_kind") for c in dataset["categories"]}
    num_gt, num_dets = _counts(ev)

    per_class: list[ClassAP] = []
    curves: dict[int, np.ndarray] = {}
    for k, cat_id in enumerate(int(c) for c in p.catIds):
        pr50 = precision[t50, :, k, a_all, m]
        per_class.append(
            ClassAP(
                category_id=cat_id,
                name=names[cat_id],
                split=splits[cat_id],
                ap50=mean_valid(pr50),
                ap=mean_valid(precision[:, :, k, a_all, m]),
                num_gt=num_gt[cat_id],
                num_dets=num_dets[cat_id],
                novel_kind=kinds[cat_id] if splits[cat_id] == "novel" else None,
            )
        )
        curves[cat_id] = np.where(pr50 > -1, pr50, np.nan).astype(float)

    return SplitMetrics(
        ap50_novel=split_mean(per_class, "novel"),
        ap50_base=split_mean(per_class, "base"),
        ap50_all=split_mean(per_class, None),
        ap=mean_valid(precision[:, :, :, a_all, m]),
        per_class=per_class,
        classes_without_gt=[c.category_id for c in per_class if np.isnan(c.ap50)],
        max_dets=max_dets,
        novel_kinds=novel_kind_means(per_class),
        base_named_novel=base_named_novel(dataset, dets, splits),
        pr=curves,
        recall_thresholds=np.asarray(p.recThrs, dtype=float).copy(),
    )

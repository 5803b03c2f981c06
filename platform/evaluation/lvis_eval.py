"""LVIS open-vocabulary evaluation: box AP, APr, APc, APf via lvis-api's LVISEval.

LVIS v1 OVD (methods.md): base = frequent + common, novel = rare; the reported
numbers are LVISEval's own AP/APr/APc/APf at 300 detections per image. LVIS is a
federated dataset: a detection of a class neither annotated nor listed as negative
in its image is not scored, and unmatched detections of a class in the image's
``not_exhaustive_category_ids`` are ignored, so images must carry both lists.

``lvis`` 0.5.3 (the current release) still calls ``np.float``, removed in numpy 1.24;
:func:`_numpy_compat_for_lvis` gives its ``eval`` module a numpy that has the alias
instead of editing site-packages. ``lvis`` is imported lazily: its ``__init__`` calls
``logging.basicConfig``, which should not happen just because this package was
imported.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ovdlab.platform.evaluation.common import (
    per_class_counts,
    ClassAP,
    check_gt,
    eval_copy_of_gt,
    load_json_input,
    mean_valid,
    prepare_results,
)

FREQUENCIES = ("r", "c", "f")
LVIS_LOGGERS = ("lvis.lvis", "lvis.results", "lvis.eval")


@dataclass
class LVISMetrics:
    """LVIS metrics in percent; per-class rows carry ``frequency`` and the OVD split.

    ``pr`` and ``recall_thresholds`` are as in ``SplitMetrics`` (IoU 0.5, area all).
    """

    ap: float
    apr: float
    apc: float
    apf: float
    per_class: list[ClassAP]
    classes_without_gt: list[int] = field(default_factory=list)
    max_dets: int = 300
    pr: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    recall_thresholds: np.ndarray = field(default_factory=lambda: np.linspace(0.0, 1.0, 101), repr=False, compare=False)

    def as_dict(self) -> dict[str, float]:
        """Flat metric names, as logged to MLflow."""
        return {"ap": self.ap, "apr": self.apr, "apc": self.apc, "apf": self.apf}


class _NumpyWithRemovedAliases:
    """numpy plus ``float``, the alias lvis 0.5.3's ``accumulate`` uses (``np.float``)."""

    float = float

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def _numpy_compat_for_lvis() -> None:
    """Rebind ``lvis.eval.np`` when numpy lacks ``np.float`` (idempotent, lvis-local)."""
    import lvis.eval as lvis_eval_module

    if not hasattr(lvis_eval_module.np, "float"):
        lvis_eval_module.np = _NumpyWithRemovedAliases()


@contextlib.contextmanager
def _quiet_lvis() -> Iterator[None]:
    """Silence lvis-api's info/warning logs and its ``Logger.warn`` deprecation warnings."""
    loggers = [logging.getLogger(name) for name in LVIS_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_lvis_gt(dataset: dict[str, Any]) -> None:
    """LVIS fields the federated evaluation needs, with errors naming the entry."""
    for img in dataset["images"]:
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if not isinstance(img.get(key), list):
                raise ValueError(f"LVIS ground truth image {img['id']} has no {key!r} list")
    for cat in dataset["categories"]:
        if cat.get("frequency") not in FREQUENCIES:
            raise ValueError(
                f"LVIS category {cat['id']} ({cat.get('name', '?')!r}) has frequency {cat.get('frequency')!r}; "
                f"expected one of {FREQUENCIES}"
            )


def _run_lvis_eval(gt: dict[str, Any], dets: list[dict[str, Any]], max_dets: int) -> Any:
    """One LVISEval box run on a dict ground truth (LVIS() only reads files)."""
    from lvis import LVIS, LVISEval, LVISResults

    _numpy_compat_for_lvis()
    with _quiet_lvis():
        lvis_gt = LVIS.__new__(LVIS)
        lvis_gt.logger = logging.getLogger("lvis.lvis")
        lvis_gt.dataset = gt
        lvis_gt._create_index()
        if dets:
            lvis_dt = LVISResults(lvis_gt, dets, max_dets=max_dets)
        else:
            # LVISResults reads results[0]; an empty results object scores AP 0.
            lvis_dt = LVISResults.__new__(LVISResults)
            lvis_dt.logger = logging.getLogger("lvis.results")
            lvis_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            lvis_dt._create_index()
        ev = LVISEval(lvis_gt, lvis_dt, iou_type="bbox")
        ev.params.max_dets = max_dets
        ev.run()
    return ev


def _counts(ev: Any) -> tuple[dict[int, int], dict[int, int]]:
    """Per-class numbers of non-ignored gts and scored detections (area "all")."""
    all_area = ev.params.area_rng[ev.params.area_rng_lbl.index("all")]
    return per_class_counts(ev.params.cat_ids, ev.eval_imgs, all_area, "area_rng", "gt_ignore", "dt_ids")


def _percent(value: float) -> float:
    """LVISEval reports -1 for "no valid entry"; that is NaN here, else percent."""
    return float("nan") if value == -1 else float(value) * 100.0


def evaluate_lvis_ovd(gt: Path | str | dict, results: list[dict] | Path | str, max_dets: int = 300) -> LVISMetrics:
    """LVIS box AP, APr, APc, APf (LVISEval's own summary) and a per-class table.

    Per-class AP is ``precision[:, :, k, area=all]`` averaged over entries > -1, the
    reduction LVISEval applies to the whole array; AP50 the same at IoU 0.5. Rare
    classes form the novel split, frequent and common the base split.
    """
    dataset = check_gt(load_json_input(gt, "ground truth"))
    check_lvis_gt(dataset)
    image_ids = {int(img["id"]) for img in dataset["images"]}
    cat_ids = {int(cat["id"]) for cat in dataset["categories"]}
    dets = prepare_results(results, image_ids, cat_ids, max_dets)
    ev = _run_lvis_eval(eval_copy_of_gt(dataset), dets, max_dets)

    precision = ev.eval["precision"]  # [T, R, K, A]
    p = ev.params
    t50 = int(np.where(p.iou_thrs == 0.5)[0][0])
    a_all = p.area_rng_lbl.index("all")
    cats = {int(c["id"]): c for c in dataset["categories"]}
    num_gt, num_dets = _counts(ev)

    per_class: list[ClassAP] = []
    curves: dict[int, np.ndarray] = {}
    for k, cat_id in enumerate(int(c) for c in p.cat_ids):
        cat = cats[cat_id]
        pr50 = precision[t50, :, k, a_all]
        per_class.append(
            ClassAP(
                category_id=cat_id,
                name=str(cat.get("name", cat_id)),
                split="novel" if cat["frequency"] == "r" else "base",
                ap50=mean_valid(pr50),
                ap=mean_valid(precision[:, :, k, a_all]),
                num_gt=num_gt[cat_id],
                num_dets=num_dets[cat_id],
                frequency=cat["frequency"],
            )
        )
        curves[cat_id] = np.where(pr50 > -1, pr50, np.nan).astype(float)

    res = ev.results
    return LVISMetrics(
        ap=_percent(res["AP"]),
        apr=_percent(res["APr"]),
        apc=_percent(res["APc"]),
        apf=_percent(res["APf"]),
        per_class=per_class,
        classes_without_gt=[c.category_id for c in per_class if np.isnan(c.ap)],
        max_dets=max_dets,
        pr=curves,
        recall_thresholds=np.asarray(p.rec_thrs, dtype=float).copy(),
    )

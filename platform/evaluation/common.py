"""Input handling shared by the COCO and LVIS evaluators.

Both pycocotools and lvis-api trust their inputs: an unknown image id fails on a bare
``assert``, an empty result list on ``anns[0]``, a ground-truth annotation with id 0
is silently counted as unmatched (both store the matched gt id and test it for
non-zero), and both write ``id``/``area``/``segmentation`` into the caller's dicts.
The functions here validate first, with errors that name the offending entries, and
hand the evaluators fresh copies.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import math
import numbers
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pycocotools import mask as mask_utils

SPLITS = ("novel", "base")
MAX_LISTED_IDS = 5


@dataclass(frozen=True)
class ClassAP:
    """One category's row of the per-class table; AP values in percent, NaN without gt.

    ``num_gt`` counts the non-ignored (non-crowd) ground truths the evaluator used and
    ``num_dets`` the detections it scored for the class (after the per-image cap and,
    for LVIS, after its federated filtering). ``frequency`` is LVIS' r/c/f, else None.
    ``novel_kind`` is a novel category's ``novel_kind`` tag when its dataset gives one
    (the shapes world: ``comp``, a new pair of known attributes, or ``concept``, an
    attribute no base class shows), else None.
    """

    category_id: int
    name: str
    split: str
    ap50: float
    ap: float
    num_gt: int
    num_dets: int
    frequency: str | None = None
    novel_kind: str | None = None


def load_json_input(value: Path | str | dict | list, what: str) -> Any:
    """A loaded JSON object, reading ``value`` when it is a path."""
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"{what} file not found: {path}")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{what} file {path} is not valid JSON: {err}") from err
    return value


def _listed(ids: Iterable[Any]) -> str:
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:MAX_LISTED_IDS])
    more = f" and {len(ids) - MAX_LISTED_IDS} more" if len(ids) > MAX_LISTED_IDS else ""
    return f"[{shown}{more}]"


def _as_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _as_number(value: Any, where: str) -> float:
    """A finite real number as float; strings and bools are refused, not converted.

    ``float("0.9")`` and ``float(True)`` succeed, so a results file written with quoted
    scores or boxes would otherwise be scored as if it were well-formed.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{where} must be finite, got {number}")
    return number


def _as_box(value: Any, where: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ValueError(f"{where}.bbox must be 4 numbers [x, y, w, h], got {value!r}")
    box = [_as_number(v, f"{where}.bbox[{i}]") for i, v in enumerate(value)]
    if box[2] < 0 or box[3] < 0:
        raise ValueError(f"{where}.bbox must have w, h >= 0, got {value!r}")
    return box


def check_gt(dataset: Any) -> dict[str, Any]:
    """Validate the COCO structure of a ground-truth dict (ids unique, references known)."""
    if not isinstance(dataset, dict):
        raise TypeError(f"ground truth must be a COCO-format dict or a path to one, got {type(dataset).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ValueError(f"ground truth has no {key!r} list")
    if not dataset["images"]:
        raise ValueError("ground truth has no images")
    if not dataset["categories"]:
        raise ValueError("ground truth has no categories")
    for key in ("images", "categories"):
        seen: set[int] = set()
        dupes = []
        for i, entry in enumerate(dataset[key]):
            if not isinstance(entry, dict) or "id" not in entry:
                raise ValueError(f"ground truth {key}[{i}] has no 'id'")
            ident = _as_int(entry["id"], f"ground truth {key}[{i}].id")
            if ident in seen:
                dupes.append(ident)
            seen.add(ident)
        if dupes:
            raise ValueError(f"ground truth {key} ids are not unique: {_listed(dupes)}")
    image_ids = {int(img["id"]) for img in dataset["images"]}
    cat_ids = {int(cat["id"]) for cat in dataset["categories"]}
    for i, ann in enumerate(dataset["annotations"]):
        name = f"ground truth annotation {ann.get('id', f'#{i}') if isinstance(ann, dict) else f'#{i}'}"
        if not isinstance(ann, dict):
            raise ValueError(f"{name} is not a dict")
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise ValueError(f"{name} has no {key!r}")
        if _as_int(ann["image_id"], f"{name}.image_id") not in image_ids:
            raise ValueError(f"{name} refers to image_id {ann['image_id']!r}, which is not in images")
        if _as_int(ann["category_id"], f"{name}.category_id") not in cat_ids:
            raise ValueError(f"{name} refers to category_id {ann['category_id']!r}, which is not in categories")
        _as_box(ann["bbox"], name)
    return dataset


def eval_copy_of_gt(dataset: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy whose annotations both evaluators can use safely.

    Annotation ids are renumbered 1..N because the evaluators record "matched gt id"
    and read 0 as "unmatched", and a duplicated id would overwrite an entry of their
    index. Missing ``iscrowd`` defaults to 0 and missing ``area`` to the box area
    (COCOeval reads both for every gt). The annotation dicts are copies, since the
    evaluators write an ``ignore`` flag into them.
    """
    annotations = []
    for new_id, ann in enumerate(dataset["annotations"], start=1):
        copy = dict(ann)
        copy["id"] = new_id
        copy.setdefault("iscrowd", 0)
        if "area" not in copy:
            _, _, w, h = (float(v) for v in ann["bbox"])
            copy["area"] = w * h
        annotations.append(copy)
    return {**dataset, "annotations": annotations}


def prepare_results(results: Any, image_ids: set[int], cat_ids: set[int], max_dets: int) -> list[dict[str, Any]]:
    """Validated copies of ``results``, at most ``max_dets`` per image (highest scores).

    COCOeval sorts and caps detections per (image, category), not per image, so a
    result list longer than ``max_dets`` on an image would otherwise be scored with
    more than the benchmark's detections per image. The cap uses a stable sort, the
    same rule as ``lvis.LVISResults.limit_dets_per_image``.
    """
    if max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    results = load_json_input(results, "results")
    if not isinstance(results, list):
        raise ValueError(f"results must be a list of detections, got {type(results).__name__}")
    dets: list[dict[str, Any]] = []
    bad_images: dict[int, None] = {}
    bad_cats: dict[int, None] = {}
    for i, res in enumerate(results):
        where = f"result {i}"
        if not isinstance(res, dict):
            raise ValueError(f"{where} is not a dict: {res!r}")
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in res]
        if missing:
            raise ValueError(f"{where} has no {', '.join(missing)}")
        image_id = _as_int(res["image_id"], f"{where}.image_id")
        cat_id = _as_int(res["category_id"], f"{where}.category_id")
        score = _as_number(res["score"], f"{where}.score")
        if image_id not in image_ids:
            bad_images[image_id] = None
        if cat_id not in cat_ids:
            bad_cats[cat_id] = None
        dets.append({"image_id": image_id, "category_id": cat_id, "bbox": _as_box(res["bbox"], where), "score": score})
    if bad_images:
        raise ValueError(f"results refer to {len(bad_images)} image id(s) not in the ground truth: {_listed(bad_images)}")
    if bad_cats:
        raise ValueError(f"results refer to {len(bad_cats)} category id(s) not in the ground truth: {_listed(bad_cats)}")
    return limit_per_image(dets, max_dets)


def limit_per_image(dets: list[dict[str, Any]], max_dets: int) -> list[dict[str, Any]]:
    """Keep the ``max_dets`` highest-scoring detections of every image (stable on ties)."""
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for det in dets:
        by_image[det["image_id"]].append(det)
    kept: list[dict[str, Any]] = []
    for image_dets in by_image.values():
        if len(image_dets) > max_dets:
            image_dets = sorted(image_dets, key=lambda d: -d["score"])[:max_dets]
        kept.extend(image_dets)
    return kept


def base_named_novel(
    dataset: dict[str, Any], dets: list[dict[str, Any]], splits: dict[int, str], iou: float = 0.5
) -> float:
    """Percent of the base ground-truth objects whose best-scoring detection at IoU >= ``iou``
    carries a novel label (crowd boxes left out; NaN without base objects).

    In the generalized setting every class of the vocabulary competes for every box. A
    novel class's text embedding that the region embeddings drift towards -- nothing in
    training on base boxes keeps them away from it -- wins base objects: their base label
    survives only as a lower-scoring detection, often below the score threshold, and
    base AP50 falls although the detector localizes and knows the base class. AP cannot
    tell that from a detector that never learned the class; this share can.
    """
    base_boxes: dict[int, list[list[float]]] = defaultdict(list)
    for ann in dataset["annotations"]:
        if splits.get(int(ann["category_id"])) == "base" and not ann.get("iscrowd", 0):
            base_boxes[int(ann["image_id"])].append(list(ann["bbox"]))
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for det in dets:
        by_image[int(det["image_id"])].append(det)
    named_novel = 0
    for image_id, gts in base_boxes.items():
        candidates = sorted(by_image.get(image_id, []), key=lambda d: -d["score"])
        if not candidates:
            continue
        # COCOeval's own box IoU, [detections, objects], detections best first
        boxes = np.asarray([d["bbox"] for d in candidates], dtype=float)
        overlaps = mask_utils.iou(boxes, np.asarray(gts, dtype=float), [0] * len(gts))
        for column in np.asarray(overlaps).T:
            hits = np.flatnonzero(column >= iou)
            named_novel += bool(hits.size) and splits.get(int(candidates[hits[0]]["category_id"])) == "novel"
    base_objects = sum(len(gts) for gts in base_boxes.values())
    return 100.0 * named_novel / base_objects if base_objects else float("nan")


def tied_top_pct(results: list[dict[str, Any]]) -> float:
    """Percent of scored boxes whose best class score is shared by another class.

    Detections of one box (same image and box: class-agnostic regression gives every
    class the same box) are grouped; a tie at the top means the classifier cannot say
    which class the box is. A saturated sigmoid makes them: ``sigmoid(50 cos)`` is exactly
    1.0 in float32 from cos 0.333 on (CLIFF's reference scale on a teacher whose cosines
    are not CLIP's). Boxes with a single detection cannot tie.
    """
    by_box: dict[tuple[Any, ...], list[float]] = {}
    for det in results:
        by_box.setdefault((det["image_id"], *map(float, det["bbox"])), []).append(float(det["score"]))
    if not by_box:
        return 0.0
    tied = sum(1 for scores in by_box.values() if len(scores) > 1 and sorted(scores)[-1] == sorted(scores)[-2])
    return 100.0 * tied / len(by_box)


def mean_valid(values: np.ndarray) -> float:
    """Mean of the entries > -1 (the evaluators' "undefined" marker), in percent; NaN if none.

    This is the reduction of ``COCOeval.summarize`` / ``LVISEval._summarize``.
    """
    valid = values[values > -1]
    return float(np.mean(valid) * 100.0) if valid.size else float("nan")


def split_mean(per_class: list[ClassAP], split: str | None, attr: str = "ap50") -> float:
    """Mean of a per-class AP over a split's classes that have ground truth (NaN if none)."""
    vals = [getattr(c, attr) for c in per_class if (split is None or c.split == split) and not math.isnan(getattr(c, attr))]
    return float(np.mean(vals)) if vals else float("nan")


def novel_kind_means(per_class: list[ClassAP], attr: str = "ap50") -> dict[str, float]:
    """Mean per-class AP of the novel classes of each ``novel_kind`` (classes with ground truth)."""
    kinds = sorted({c.novel_kind for c in per_class if c.split == "novel" and c.novel_kind})
    out = {}
    for kind in kinds:
        vals = [getattr(c, attr) for c in per_class if c.novel_kind == kind and not math.isnan(getattr(c, attr))]
        out[kind] = float(np.mean(vals)) if vals else float("nan")
    return out


def per_class_counts(cat_ids, eval_imgs, all_area, area_key: str, ignore_key: str, dets_key: str) -> tuple[dict[int, int], dict[int, int]]:
    """Per-class numbers of non-ignored gts and scored detections over area "all".

    pycocotools and lvis-api keep the same per-image records under different key names.
    """
    num_gt: dict[int, int] = {int(c): 0 for c in cat_ids}
    num_dets: dict[int, int] = {int(c): 0 for c in cat_ids}
    for entry in eval_imgs:
        if entry is None or entry[area_key] != all_area:
            continue
        cat = int(entry["category_id"])
        num_gt[cat] += int(np.count_nonzero(np.asarray(entry[ignore_key]) == 0))
        num_dets[cat] += len(entry[dets_key])
    return num_gt, num_dets


@contextlib.contextmanager
def silenced_prints() -> Iterator[None]:
    """Discard what evaluation libraries ``print`` (pycocotools' progress lines).

    Redirecting ``sys.stdout`` is not enough inside a Ray Train worker: Train V2 patches
    ``builtins.print`` to send every line to the root logger as well, so the progress of
    each in-loop evaluation reached the driver's console. ``print`` is swapped for a no-op
    for the duration, and restored after.
    """
    original = builtins.print
    builtins.print = lambda *args, **kwargs: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        builtins.print = original

"""LVIS v1 open-vocabulary split: base = frequent + common (866), novel = rare (337).

ViLD (Gu et al. 2021, Sec. 4.1) and the methods after it train on LVIS v1 without
the annotations of the 337 rare categories and report APr on them (see
``docs/methods.md``). Every category keeps its LVIS ``frequency`` and
gains a ``split`` tag; image fields (``neg_category_ids``,
``not_exhaustive_category_ids``) are copied unchanged, as LVIS evaluation needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from ovdlab.platform.data._jsonio import read_json, write_json_atomic

BASE_FREQUENCIES = frozenset({"f", "c"})
NOVEL_FREQUENCIES = frozenset({"r"})

Mode = Literal["train", "val"]


def _split_of(src_json: Path, category: dict[str, Any]) -> str:
    freq = category.get("frequency")
    if freq in BASE_FREQUENCIES:
        return "base"
    if freq in NOVEL_FREQUENCIES:
        return "novel"
    where = f"category id {category.get('id')} ({category.get('name', '?')!r})"
    if freq is None:
        raise ValueError(f"{src_json}: {where} has no 'frequency' field; is this an LVIS v1 file?")
    raise ValueError(f"{src_json}: {where} has frequency {freq!r}; expected one of 'f', 'c', 'r'")


def _with_file_name(src_json: Path, image: dict[str, Any]) -> dict[str, Any]:
    """LVIS v1 names an image by its ``coco_url`` only; its validation images come from
    both COCO 2017 folders. ``file_name`` becomes ``<folder>/<file>`` from that URL
    (``train2017/000000391895.jpg``), relative to an image root that holds COCO's
    ``train2017`` and ``val2017`` (as detectron2 resolves LVIS images)."""
    if "file_name" in image:
        return image
    url = image.get("coco_url")
    if not url:
        raise ValueError(f"{src_json}: image {image.get('id')} has neither file_name nor coco_url")
    return {**image, "file_name": "/".join(str(url).rstrip("/").split("/")[-2:])}


def convert_lvis_ovd(src_json: Path, out_json: Path, mode: Mode) -> dict[str, int]:
    """Write the OVD version of an LVIS v1 file; returns counts.

    ``mode="train"`` drops the annotations of rare categories; ``mode="val"`` keeps
    every annotation. Both keep all categories, tagged ``split`` by frequency.
    """
    if mode not in ("train", "val"):
        raise ValueError(f"mode must be 'train' or 'val', got {mode!r}")
    src_json, out_json = Path(src_json), Path(out_json)
    data = read_json(src_json, "LVIS annotation file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(f"{src_json}: not an LVIS annotation file (no {key!r} list)")
    categories = [{**c, "split": _split_of(src_json, c)} for c in data["categories"]]
    categories.sort(key=lambda c: int(c["id"]))
    novel_ids = {int(c["id"]) for c in categories if c["split"] == "novel"}
    known_ids = {int(c["id"]) for c in categories}
    unknown = [a.get("id") for a in data["annotations"] if int(a.get("category_id", -1)) not in known_ids]
    if unknown:
        raise ValueError(
            f"{src_json}: {len(unknown)} annotation(s) with a missing or unknown category_id, e.g. id {unknown[0]}"
        )
    images = [_with_file_name(src_json, image) for image in data["images"]]
    if mode == "train":
        annotations = [a for a in data["annotations"] if int(a["category_id"]) not in novel_ids]
    else:
        annotations = list(data["annotations"])
    write_json_atomic(out_json, {**data, "images": images, "annotations": annotations, "categories": categories})
    n_novel = sum(1 for a in annotations if int(a["category_id"]) in novel_ids)
    return {
        "images": len(data["images"]),
        "annotations": len(annotations),
        "base_annotations": len(annotations) - n_novel,
        "novel_annotations": n_novel,
        "dropped_annotations": len(data["annotations"]) - len(annotations),
        "categories": len(categories),
        "base_categories": len(categories) - len(novel_ids),
        "novel_categories": len(novel_ids),
    }

"""COCO open-vocabulary split: 48 base / 17 novel classes (the "OVR-CNN split").

Zareian et al. (OVR-CNN, CVPR 2021) split COCO 2017 into 48 base and 17 novel
classes; ViLD, LP-OVOD, EZSD and CLIFF all report AP50 on it (see
``docs/methods.md``). The remaining 15 COCO classes are outside the
benchmark. Training keeps every image but only base boxes (the images keep their
unlabelled novel objects); evaluation uses all boxes of the 65 classes. Converted
files carry a ``split`` tag ("base" / "novel") on each category, which is how the
rest of the platform (``catalog.OVDDataset``) tells the two apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from ovdlab.platform.data._jsonio import read_json, write_json_atomic

BASE_CLASSES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 7: "train", 8: "truck", 9: "boat",
    15: "bench", 16: "bird", 19: "horse", 20: "sheep", 23: "bear", 24: "zebra", 25: "giraffe",
    27: "backpack", 31: "handbag", 33: "suitcase", 34: "frisbee", 35: "skis", 38: "kite",
    42: "surfboard", 44: "bottle", 48: "fork", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 59: "pizza", 60: "donut",
    62: "chair", 65: "bed", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    78: "microwave", 79: "oven", 80: "toaster", 82: "refrigerator", 84: "book", 85: "clock",
    86: "vase", 90: "toothbrush",
}  # fmt: skip
NOVEL_CLASSES: dict[int, str] = {
    5: "airplane", 6: "bus", 17: "cat", 18: "dog", 21: "cow", 22: "elephant", 28: "umbrella",
    32: "tie", 36: "snowboard", 41: "skateboard", 47: "cup", 49: "knife", 61: "cake", 63: "couch",
    76: "keyboard", 81: "sink", 87: "scissors",
}  # fmt: skip

BASE_IDS: tuple[int, ...] = tuple(sorted(BASE_CLASSES))
NOVEL_IDS: tuple[int, ...] = tuple(sorted(NOVEL_CLASSES))

Mode = Literal["train", "val"]


def _check_categories(src_json: Path, categories: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The input must use the original (non-contiguous) COCO ids with their names."""
    no_id = [c for c in categories if "id" not in c]
    if no_id:
        raise ValueError(f"{src_json}: category without an id: {no_id[0]}")
    by_id = {int(c["id"]): c for c in categories}
    expected = {**BASE_CLASSES, **NOVEL_CLASSES}
    missing = sorted(set(expected) - set(by_id))
    if missing:
        raise ValueError(
            f"{src_json}: not a COCO instances file with original category ids: "
            f"missing ids {missing} ({', '.join(expected[i] for i in missing)})"
        )
    wrong = [
        f"{i} is {by_id[i].get('name')!r}, expected {name!r}"
        for i, name in expected.items()
        if str(by_id[i].get("name", "")).strip().lower() != name
    ]
    if wrong:
        raise ValueError(f"{src_json}: category ids do not follow COCO numbering: " + "; ".join(wrong))
    return by_id


def convert_coco_ovd(src_json: Path, out_json: Path, mode: Mode) -> dict[str, int]:
    """Write the OVD version of a COCO instances file; returns counts.

    ``mode="train"``: every image, base annotations only. ``mode="val"``: every image,
    annotations of the 65 benchmark classes. Both keep the 65 categories, each tagged
    ``"split": "base" | "novel"``; annotations are otherwise copied unchanged.
    """
    if mode not in ("train", "val"):
        raise ValueError(f"mode must be 'train' or 'val', got {mode!r}")
    src_json, out_json = Path(src_json), Path(out_json)
    data = read_json(src_json, "COCO annotation file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(f"{src_json}: not a COCO instances file (no {key!r} list)")
    by_id = _check_categories(src_json, data["categories"])
    keep_ids = set(BASE_IDS) if mode == "train" else set(BASE_IDS) | set(NOVEL_IDS)
    categories = [
        {**by_id[i], "split": "base" if i in BASE_CLASSES else "novel"} for i in sorted(set(BASE_IDS) | set(NOVEL_IDS))
    ]
    no_cat = [a.get("id") for a in data["annotations"] if "category_id" not in a]
    if no_cat:
        raise ValueError(f"{src_json}: {len(no_cat)} annotation(s) without category_id, e.g. id {no_cat[0]}")
    annotations = [a for a in data["annotations"] if int(a["category_id"]) in keep_ids]
    out = {**data, "annotations": annotations, "categories": categories}
    write_json_atomic(out_json, out)
    base = set(BASE_IDS)
    n_base = sum(1 for a in annotations if int(a["category_id"]) in base)
    return {
        "images": len(data["images"]),
        "annotations": len(annotations),
        "base_annotations": n_base,
        "novel_annotations": len(annotations) - n_base,
        "dropped_annotations": len(data["annotations"]) - len(annotations),
        "categories": len(categories),
        "base_categories": len(BASE_IDS),
        "novel_categories": len(NOVEL_IDS),
    }

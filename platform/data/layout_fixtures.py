"""Small generated datasets in the COCO and LVIS layouts: real category ids and names,
synthetic pixels.

The COCO and LVIS jobs have a smoke mode (``--smoke``) that runs them end to end on a
laptop, through the very code path of the real datasets: the raw files are written as
COCO 2017 instances / LVIS v1 files (original category ids and names; LVIS with its
``frequency`` tags and ``coco_url`` instead of ``file_name``), converted by the same
``ovdlab data coco-ovd`` / ``lvis-ovd`` converters into the files the dataset configs
name, with images in COCO's ``train2017`` / ``val2017`` folders. Pixels are filled
rectangles and ellipses, one colour per category: nothing is learned from them; the
point is that every stage runs on the real layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ovdlab.platform.data._jsonio import write_json_atomic
from ovdlab.platform.data.coco_ovd import BASE_CLASSES, NOVEL_CLASSES, convert_coco_ovd
from ovdlab.platform.data.lvis_ovd import convert_lvis_ovd

LVIS_SAMPLE: tuple[tuple[int, str, str], ...] = (
    (1, "acorn", "r"), (2, "aerosol_can", "c"), (3, "air_conditioner", "f"), (4, "airplane", "f"),
    (5, "alarm_clock", "c"), (6, "alcohol", "c"), (7, "alligator", "r"), (8, "almond", "c"),
    (9, "ambulance", "c"), (10, "amplifier", "r"), (11, "anklet", "c"), (12, "antenna", "f"),
    (13, "apple", "f"), (14, "apple_juice", "r"), (15, "applesauce", "r"), (16, "apricot", "r"),
    (17, "apron", "f"), (18, "aquarium", "c"), (19, "armband", "c"), (20, "armchair", "f"),
)  # fmt: skip
"""The first 20 LVIS v1 categories: id, name, frequency (r = rare = novel)."""


@dataclass(frozen=True)
class Layout:
    """Where a fixture's files went: the dataset root and the converted annotation files."""

    root: Path
    train_json: Path
    val_json: Path


def _draw_image(rng: np.random.Generator, size: int, category_ids: list[int]) -> tuple[Image.Image, list[dict[str, Any]]]:
    """A grey image with 1-3 objects of the given categories; their COCO boxes."""
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(90, 160, 3)))
    draw = ImageDraw.Draw(image)
    objects = []
    for cid in rng.choice(category_ids, size=int(rng.integers(1, 4)), replace=False):
        w, h = (int(v) for v in rng.integers(size // 6, size // 2, 2))
        x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        colour = tuple(int(v) for v in np.random.default_rng(int(cid)).integers(0, 256, 3))
        (draw.ellipse if cid % 2 else draw.rectangle)([x, y, x + w - 1, y + h - 1], fill=colour)
        objects.append({"category_id": int(cid), "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h)})
    return image, objects


def _write_split(
    root: Path, folder: str, count: int, first_id: int, size: int, category_ids: list[int], seed: int, coco_url: bool
) -> dict[str, list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    (root / folder).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(first_id, first_id + count):
        name = f"{image_id:012d}.jpg"
        image, objects = _draw_image(rng, size, category_ids)
        image.save(root / folder / name, quality=95)
        info: dict[str, Any] = {"id": image_id, "width": size, "height": size}
        if coco_url:  # LVIS v1: named by URL; negative (verified absent) and not-exhaustive categories
            present = {obj["category_id"] for obj in objects}
            info["coco_url"] = f"http://images.cocodataset.org/{folder}/{name}"
            info["neg_category_ids"] = [c for c in category_ids if c not in present][:3]
            info["not_exhaustive_category_ids"] = []
        else:
            info["file_name"] = name
        images.append(info)
        for obj in objects:
            annotations.append({"id": len(annotations) + first_id * 10, "image_id": image_id, "iscrowd": 0, **obj})
    return {"images": images, "annotations": annotations}


def write_coco_layout(root: str | Path, train_images: int = 16, val_images: int = 8, size: int = 96, seed: int = 0) -> Layout:
    """COCO 2017 layout with the 65 benchmark classes, converted to the 48/17 OVD files
    that ``configs/datasets/coco_ovd.yaml`` names."""
    root = Path(root)
    categories = [{"id": cid, "name": name, "supercategory": "thing"}
                  for cid, name in sorted({**BASE_CLASSES, **NOVEL_CLASSES}.items())]
    ids = [c["id"] for c in categories]
    layout = Layout(root, root / "annotations" / "ovd_ins_train2017_b.json", root / "annotations" / "ovd_ins_val2017_all.json")
    for folder, count, first, out, mode in (("train2017", train_images, 1, layout.train_json, "train"),
                                            ("val2017", val_images, 100_001, layout.val_json, "val")):
        raw = root / "raw" / f"instances_{folder}.json"
        write_json_atomic(raw, {**_write_split(root, folder, count, first, size, ids, seed + first, False),
                                "categories": categories})
        convert_coco_ovd(raw, out, mode)
    return layout


def write_lvis_layout(root: str | Path, train_images: int = 16, val_images: int = 8, size: int = 96, seed: int = 0) -> Layout:
    """LVIS v1 layout (images named by ``coco_url`` under COCO's folders) with the first
    LVIS categories (:data:`LVIS_SAMPLE`), converted to the files that
    ``configs/datasets/lvis_ovd.yaml`` names."""
    root = Path(root)
    categories = [{"id": cid, "name": name, "frequency": freq, "synonyms": [name]} for cid, name, freq in LVIS_SAMPLE]
    ids = [c["id"] for c in categories]
    layout = Layout(root, root / "annotations" / "lvis_v1_train_fc.json", root / "annotations" / "lvis_v1_val_ovd.json")
    for folder, split, count, first, out, mode in (
        ("train2017", "train", train_images, 1, layout.train_json, "train"),
        ("val2017", "val", val_images, 100_001, layout.val_json, "val"),
    ):
        raw = root / "raw" / f"lvis_v1_{split}.json"
        data = _write_split(root / "coco", folder, count, first, size, ids, seed + first, True)
        write_json_atomic(raw, {**data, "categories": categories})
        convert_lvis_ovd(raw, out, mode)
    return layout

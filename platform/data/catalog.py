"""The dataset registry: COCO-format OVD datasets (annotation json + image folder).

Every dataset the platform uses -- COCO-OVD, LVIS-OVD, the shapes world -- is a COCO
file whose categories carry ``"split": "base" | "novel"`` (written by
``coco_ovd``, ``lvis_ovd`` and ``shapes``). :class:`OVDDataset` reads it once and
validates every annotation the way the torchvision detection references do before
training (degenerate boxes removed): a box with no area, a box fully outside its
image, an unknown category or a missing box is skipped and *recorded* in
``problems``; a box partly outside its image is clipped to it and recorded in
``clipped``. Nothing is silently lost and nothing raises deep inside training.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

from ovdlab.platform.config import ExperimentConfig
from ovdlab.platform.data._jsonio import read_json
from ovdlab.platform.data.shapes import generate_shapes

log = logging.getLogger(__name__)

Split = Literal["train", "val"]
SPLITS = ("base", "novel")


def _check_box(bbox: Any, width: float, height: float) -> tuple[list[float] | None, str | None]:
    """(clipped xywh box, None) for a usable box, (None, reason) otherwise."""
    if bbox is None:
        return None, "missing bbox"
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None, f"bbox must be 4 numbers [x, y, w, h], got {bbox!r}"
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None, f"bbox has a non-numeric value: {bbox!r}"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None, f"bbox has a non-finite value: {bbox!r}"
    if w <= 0 or h <= 0:
        return None, f"bbox has zero or negative area: {bbox!r}"
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    if x1 <= x0 or y1 <= y0:
        return None, f"bbox {bbox!r} lies outside the {width}x{height} image"
    return [x0, y0, x1 - x0, y1 - y0], None


class OVDDataset:
    """A COCO-format OVD dataset: categories tagged base/novel, validated annotations."""

    def __init__(self, ann_json: Path, image_dir: Path) -> None:
        self.ann_json = Path(ann_json)
        self.image_dir = Path(image_dir)
        data = read_json(self.ann_json, "annotation file")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data, dict) or not isinstance(data.get(key), list):
                raise ValueError(f"{self.ann_json}: not a COCO annotation file (no {key!r} list)")
        self._categories = self._read_categories(data["categories"])
        self._images = self._read_images(data["images"])
        self.problems: list[dict[str, Any]] = []
        self.clipped: list[dict[str, Any]] = []
        self._anns: dict[int, list[dict[str, Any]]] = {i: [] for i in self._images}
        for ann in data["annotations"]:
            self._add_annotation(ann)
        if self.problems:
            log.warning("%s: skipped %d invalid annotation(s); see OVDDataset.problems", self.ann_json, len(self.problems))
        self._image_ids = tuple(sorted(self._images))

    def _read_categories(self, categories: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for cat in categories:
            if "id" not in cat:
                raise ValueError(f"{self.ann_json}: category without an id: {cat}")
            cid = int(cat["id"])
            name = f"category {cid} ({cat.get('name', '?')!r})"
            if cid in out:
                raise ValueError(f"{self.ann_json}: {name} appears twice")
            if "split" not in cat:
                raise ValueError(
                    f"{self.ann_json}: {name} has no 'split' tag; convert the file with "
                    "`ovdlab data coco-ovd` / `ovdlab data lvis-ovd` first"
                )
            if cat["split"] not in SPLITS:
                raise ValueError(f"{self.ann_json}: {name} has split {cat['split']!r}; expected 'base' or 'novel'")
            out[cid] = dict(cat)
        return dict(sorted(out.items()))

    def _read_images(self, images: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for img in images:
            if "id" not in img:
                raise ValueError(f"{self.ann_json}: image entry without an id: {img}")
            iid = int(img["id"])
            if iid in out:
                raise ValueError(f"{self.ann_json}: image id {iid} appears twice")
            missing = [k for k in ("file_name", "width", "height") if k not in img]
            if missing:
                raise ValueError(f"{self.ann_json}: image {iid} lacks {', '.join(missing)}")
            out[iid] = dict(img)
        return out

    def _add_annotation(self, ann: dict[str, Any]) -> None:
        image_id, ann_id = ann.get("image_id"), ann.get("id")

        def skip(kind: str, reason: str) -> None:
            self.problems.append({"image_id": image_id, "ann_id": ann_id, "kind": kind, "reason": reason})

        if image_id not in self._images:
            skip("unknown_image", f"unknown image id {image_id!r}")
            return
        if ann.get("category_id") not in self._categories:
            skip("unknown_category", f"unknown category id {ann.get('category_id')!r}")
            return
        info = self._images[image_id]
        box, reason = _check_box(ann.get("bbox"), info["width"], info["height"])
        if box is None:
            skip("invalid_bbox", reason or "invalid bbox")
            return
        if box != [float(v) for v in ann["bbox"]]:
            self.clipped.append({
                "image_id": image_id, "ann_id": ann_id, "kind": "clipped_bbox",
                "reason": f"bbox {ann['bbox']} clipped to the image: {box}",
            })
        self._anns[image_id].append({**ann, "bbox": box})

    def problem_counts(self) -> dict[str, int]:
        """Skipped annotations per kind (``unknown_image``, ``unknown_category``,
        ``invalid_bbox``) and ``clipped_bbox``: the counts a run and a store record."""
        counts: dict[str, int] = {}
        for item in self.problems + self.clipped:
            counts[item["kind"]] = counts.get(item["kind"], 0) + 1
        return dict(sorted(counts.items()))

    @property
    def categories(self) -> list[dict[str, Any]]:
        """Category dicts sorted by id (copies)."""
        return [dict(c) for c in self._categories.values()]

    @property
    def category_ids(self) -> tuple[int, ...]:
        return tuple(self._categories)

    @property
    def class_names(self) -> list[str]:
        """Names in category-id order (the text bank's row order)."""
        return [str(c["name"]) for c in self._categories.values()]

    @property
    def base_ids(self) -> tuple[int, ...]:
        return tuple(i for i, c in self._categories.items() if c["split"] == "base")

    @property
    def novel_ids(self) -> tuple[int, ...]:
        return tuple(i for i, c in self._categories.items() if c["split"] == "novel")

    @property
    def image_ids(self) -> tuple[int, ...]:
        return self._image_ids

    def _image(self, image_id: int) -> dict[str, Any]:
        try:
            return self._images[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in {self.ann_json}") from None

    def image_info(self, image_id: int) -> dict[str, Any]:
        return dict(self._image(image_id))

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self._image(image_id)["file_name"]

    def annotations(self, image_id: int) -> list[dict[str, Any]]:
        """Valid annotations of one image (boxes clipped to it); crowd boxes included.

        Each dict and its ``bbox`` are fresh copies; nested fields such as
        ``segmentation`` are shared with the dataset (copying them per call would be
        costly on LVIS) and must not be modified.
        """
        self._image(image_id)
        return [{**a, "bbox": list(a["bbox"])} for a in self._anns[image_id]]

    def __len__(self) -> int:
        return len(self._images)

    def __repr__(self) -> str:
        return (
            f"OVDDataset({self.ann_json}, images={len(self)}, base={len(self.base_ids)}, "
            f"novel={len(self.novel_ids)}, problems={len(self.problems)})"
        )


def _split_paths(cfg: ExperimentConfig, split: Split) -> tuple[Path, Path]:
    root = cfg.dataset_root()
    ds = cfg.dataset
    if split == "train":
        return root / ds.train_json, root / ds.train_images
    if split == "val":
        return root / ds.val_json, root / ds.val_images
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def load_dataset(cfg: ExperimentConfig, split: Split) -> OVDDataset:
    """The configured dataset's ``split`` (paths resolved against ``cfg.dataset_root()``)."""
    ann_json, image_dir = _split_paths(cfg, split)
    return OVDDataset(ann_json, image_dir)


_MAKE_HINTS: dict[str, dict[str, tuple[str, str, str]]] = {
    # kind -> split -> (command flag with its source file, file the command writes, images)
    "coco": {
        "train": ("coco-ovd --instances-train instances_train2017.json", "ovd_ins_train2017_b.json", "train2017"),
        "val": ("coco-ovd --instances-val instances_val2017.json", "ovd_ins_val2017_all.json", "val2017"),
    },
    "lvis": {
        "train": ("lvis-ovd --train lvis_v1_train.json", "lvis_v1_train_fc.json", "COCO 2017 (train2017/ and val2017/)"),
        "val": ("lvis-ovd --val lvis_v1_val.json", "lvis_v1_val_ovd.json", "COCO 2017 (train2017/ and val2017/)"),
    },
}


def ensure_dataset(cfg: ExperimentConfig) -> Path:
    """Make sure the configured dataset is on disk; returns its root.

    ``shapes``: generated into the root when missing (a no-op when complete).
    ``coco`` / ``lvis``: checked only; a missing file raises FileNotFoundError naming
    it and the ``ovdlab data`` command that makes it.
    """
    root = cfg.dataset_root()
    kind = cfg.dataset.kind
    if kind == "shapes":
        if cfg.dataset.shapes is None:
            raise ValueError("dataset.kind is 'shapes' but dataset.shapes is null")
        generate_shapes(root, cfg.dataset.shapes)
    for split in ("train", "val"):
        ann_json, image_dir = _split_paths(cfg, split)
        if kind == "shapes":
            _check_shapes_paths(ann_json, image_dir)
            continue
        command, written, images = _MAKE_HINTS[kind][split]
        if not ann_json.is_file():
            raise FileNotFoundError(
                f"{kind} {split} annotations missing: {ann_json}; make them with "
                f"`ovdlab data {command} --out {ann_json.parent}` (it writes {written}; "
                f"dataset.{split}_json must name that file)"
            )
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{kind} {split} image folder missing: {image_dir} (the {images} images)")
    return root


def _check_shapes_paths(ann_json: Path, image_dir: Path) -> None:
    """The shapes world has a fixed layout; configured paths must point into it."""
    for path, exists in ((ann_json, ann_json.is_file()), (image_dir, image_dir.is_dir())):
        if not exists:
            raise FileNotFoundError(
                f"{path} not found after generating the shapes world, which writes "
                "annotations/{train,val}.json and images/{train,val}; check the dataset.* paths"
            )

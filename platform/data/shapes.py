"""The synthetic ``shapes`` world: a tiny open-vocabulary detection benchmark.

Every object is a coloured shape; its class is ``"{color} {shape}"`` (4 colours x
5 shapes = 20 classes). A few classes are *novel*: their objects are drawn in the
training images but carry no box in ``annotations/train.json`` -- exactly the
OVR-CNN/ViLD protocol of the COCO 48/17 split (training images keep their unlabelled
novel objects; see ``docs/methods.md``). Because every colour and every
shape also occurs in some base class, a detector can only name a novel object by
composing attributes it learned from text (the CLIP teacher sees them in
``captions_train.json``, the analogue of web image-text pairs).

Layout written under ``out_dir``::

    images/train/{id:06d}.png|jpg     images/val/{id:06d}.png|jpg
    annotations/train.json            COCO; base objects only; 20 categories tagged
    annotations/val.json              COCO; every object
    annotations/captions_train.json   {"captions": [...]}, one per train object
    shapes.json                       generation parameters, content key, digests (last)
    shapes.partial.json               while generating: parameters + key (removed at the end)

Generation is deterministic: image ``i`` of a split draws from
``numpy.random.default_rng((seed, split_code, i))``, so the same config gives
byte-identical files, and the content of one image does not depend on how many
images the split has.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from ovdlab.platform.config import ShapesConfig, content_key, file_digest
from ovdlab.platform.data._jsonio import write_json_atomic
from ovdlab.platform.progress import progress

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
"""Bump when what is written changes (2: categories tagged ``novel_kind``; ``oracle``)."""

COLOR_NAMES: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 75, 215),
    "yellow": (225, 205, 35),
}

MIN_SIZE_FRAC = 0.12
"""Smallest nominal object extent, as a fraction of the image side."""
MAX_SIZE_FRAC = 0.45
"""Largest nominal object extent, as a fraction of the image side."""
MAX_BOX_IOU = 0.3
"""A new object's box may overlap any earlier object's box up to this IoU."""
MIN_VISIBLE_FRAC = 0.6
"""Every object keeps at least this fraction of its pixels unoccluded."""
MAX_ROTATION = math.radians(25.0)
PLACEMENT_TRIES = 200

SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1}
SplitName = Literal["train", "val"]
_IMAGE_NAME = re.compile(r"^\d{6}\.(png|jpg)$")


def class_names() -> list[str]:
    """The 20 class names in category-id order (id = index + 1): colour-major."""
    return [f"{color} {shape}" for color in COLOR_NAMES for shape in SHAPE_NAMES]


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices (N, 2) of a shape centred at 0 with every vertex within radius 1.

    Keeping the circumradius at most 1 lets placement keep a rotated shape inside
    the image by keeping its centre ``size / 2`` away from the borders.
    """
    if shape == "circle":
        t = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "square":
        h = 0.7
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if shape == "triangle":
        t = np.radians([-90.0, 30.0, 150.0])
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "cross":
        a = 0.33
        return np.array(
            [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]],
            dtype=float,
        )
    if shape == "star":
        t = np.radians(-90.0 + 36.0 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPE_NAMES)}")


_UNIT_POLYGONS = {shape: _unit_polygon(shape) for shape in SHAPE_NAMES}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: enough to re-render its mask exactly (see :func:`render_mask`)."""

    color: str
    shape: str
    cx: float
    cy: float
    size: float
    angle: float
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def render_mask(obj: ShapeObject, height: int, width: int) -> np.ndarray:
    """The (H, W) bool mask of ``obj`` drawn alone, as the generator draws it."""
    poly = _UNIT_POLYGONS[obj.shape] * (obj.size / 2.0)
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    rotated = poly @ np.array([[c, s], [-s, c]])
    points = [(float(x) + obj.cx, float(y) + obj.cy) for x, y in rotated]
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    return np.asarray(canvas) > 0


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight pixel bounds of a mask as COCO xywh (pixel-edge coordinates)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    return (float(x0), float(y0), float(x1 - x0), float(y1 - y0))


def _box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _boxes_touch(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Boxes that intersect or share an edge (a 1-pixel gap is required)."""
    return a[0] <= b[0] + b[2] and b[0] <= a[0] + a[2] and a[1] <= b[1] + b[3] and b[1] <= a[1] + a[3]


def _validate(cfg: ShapesConfig) -> set[str]:
    """Check the novel names: known, listed once, and leaving base classes to train on."""
    known = class_names()
    unknown = [name for name in cfg.novel if name not in known]
    if unknown:
        raise ValueError(f"shapes.novel: unknown class name(s) {unknown}; known classes: {known}")
    if len(set(cfg.novel)) != len(cfg.novel):
        raise ValueError(f"shapes.novel lists a class twice: {cfg.novel}")
    if len(set(cfg.novel)) == len(known):
        raise ValueError("shapes.novel names every class; at least one must stay base to train on")
    return set(cfg.novel)


def novel_kind(name: str, novel: set[str]) -> str:
    """``"concept"`` when the class's colour or shape occurs in no base class, else ``"comp"``.

    A ``comp`` class is a new pair of attributes that base boxes teach separately (a
    detector can compose them); a ``concept`` class brings a visual concept that no base
    box ever shows, as COCO's and LVIS's novel categories do -- only the teacher, which
    saw captions of every class, knows it.
    """
    base = [c for c in class_names() if c not in novel]
    color, shape = name.split(" ")
    known_color = any(c.split(" ")[0] == color for c in base)
    known_shape = any(c.split(" ")[1] == shape for c in base)
    return "comp" if known_color and known_shape else "concept"


def _low_saturation_color(rng: np.random.Generator) -> np.ndarray:
    gray = rng.uniform(70.0, 200.0)
    return gray + rng.uniform(-12.0, 12.0, size=3)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A low-saturation background, so the four object colours stay distinguishable."""
    kind = ("plain", "gradient", "noisy")[int(rng.integers(3))]
    base = _low_saturation_color(rng)
    if kind == "plain":
        img = np.broadcast_to(base, (size, size, 3))
    elif kind == "gradient":
        other = _low_saturation_color(rng)
        theta = rng.uniform(0.0, 2.0 * math.pi)
        coords = (np.arange(size) + 0.5) / size - 0.5
        proj = math.cos(theta) * coords[None, :] + math.sin(theta) * coords[:, None]
        w = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
        img = base[None, None, :] * (1.0 - w[..., None]) + other[None, None, :] * w[..., None]
    else:
        sigma = rng.uniform(4.0, 14.0)
        img = base[None, None, :] + sigma * rng.standard_normal((size, size, 3), dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), kind


def _object_rgb(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    base = np.array(COLOR_RGB[color], dtype=float)
    rgb = base * rng.uniform(0.85, 1.1) + rng.uniform(-12.0, 12.0, size=3)
    r, g, b = (int(v) for v in np.clip(np.rint(rgb), 0, 255))
    return (r, g, b)


def _size_word(frac: float) -> str:
    if frac < 0.2:
        return "small "
    if frac > 0.35:
        return "large "
    return ""


@dataclass(frozen=True)
class _Placed:
    obj: ShapeObject
    box: tuple[float, float, float, float]
    area: int
    size_frac: float


def _place_objects(rng: np.random.Generator, cfg: ShapesConfig, index: int, split: str) -> list[tuple[_Placed, np.ndarray]]:
    """Sample objects with limited overlap; each keeps >= MIN_VISIBLE_FRAC of its pixels.

    Two objects of the same colour never touch: flat same-coloured shapes would
    merge into one blob whose boxes no annotator could draw.
    """
    size = cfg.image_size
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    placed: list[tuple[_Placed, np.ndarray]] = []
    visible: list[np.ndarray] = []
    for _ in range(count):
        # The class is drawn once per object, only geometry is retried, so class
        # frequencies stay uniform however crowded the image is.
        color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        shape = SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))]
        rgb = _object_rgb(rng, color)
        for attempt in range(PLACEMENT_TRIES):
            # Crowded images: shrink the largest allowed size as attempts fail.
            hi = MAX_SIZE_FRAC - (MAX_SIZE_FRAC - MIN_SIZE_FRAC) * min(1.0, attempt / (PLACEMENT_TRIES / 2))
            frac = float(rng.uniform(MIN_SIZE_FRAC, max(hi, MIN_SIZE_FRAC)))
            side = frac * size
            angle = 0.0 if shape == "circle" else float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
            half = side / 2.0
            obj = ShapeObject(
                color=color,
                shape=shape,
                cx=float(rng.uniform(half, size - half)),
                cy=float(rng.uniform(half, size - half)),
                size=side,
                angle=angle,
                rgb=rgb,
            )
            mask = render_mask(obj, size, size)
            box = mask_box(mask)
            if box is None:
                continue
            if any(_box_iou(box, p.box) > MAX_BOX_IOU for p, _ in placed):
                continue
            if any(p.obj.color == color and _boxes_touch(box, p.box) for p, _ in placed):
                continue
            if any((vis & ~mask).sum() < MIN_VISIBLE_FRAC * p.area for (p, _), vis in zip(placed, visible)):
                continue
            visible = [vis & ~mask for vis in visible]
            visible.append(mask.copy())
            placed.append((_Placed(obj, box, int(mask.sum()), frac), mask))
            break
        else:
            break
    if len(placed) < cfg.min_objects:
        raise ValueError(
            f"shapes: could place only {len(placed)} objects in {split} image {index} "
            f"({size}px, min_objects={cfg.min_objects}); lower min_objects or raise image_size"
        )
    return placed


def _caption(rng: np.random.Generator, placed: _Placed, background: str) -> str:
    """A short caption that always contains the class name verbatim."""
    adjective = _size_word(placed.size_frac)
    templates = ("a {}", "a photo of a {}", "a {} on a " + background + " background")
    template = templates[int(rng.integers(len(templates)))]
    return template.format(adjective + placed.obj.name)


def _generate_image(cfg: ShapesConfig, split: str, index: int) -> tuple[np.ndarray, list[_Placed], list[str]]:
    rng = np.random.default_rng((cfg.seed, SPLIT_CODES[split], index))
    img, background = _background(rng, cfg.image_size)
    img = img.copy()
    placed = _place_objects(rng, cfg, index, split)
    for p, mask in placed:
        img[mask] = p.obj.rgb
    captions = [_caption(rng, p, background) for p, _ in placed]
    return img, [p for p, _ in placed], captions


def generate_image(cfg: ShapesConfig, split: SplitName, index: int) -> tuple[np.ndarray, list[ShapeObject]]:
    """One image of the world (H, W, 3 uint8) and its objects in drawing order.

    The same pixels that :func:`generate_shapes` writes as PNG; tests re-render the
    objects with :func:`render_mask` to check the stored boxes.
    """
    img, placed, _ = _generate_image(cfg, split, index)
    return img, [p.obj for p in placed]


def dataset_key(cfg: ShapesConfig) -> str:
    """Content key of the dataset a config produces."""
    return content_key("shapes", GENERATOR_VERSION, cfg.model_dump(mode="json"))


def _categories(novel: set[str]) -> list[dict[str, Any]]:
    cats = []
    for i, name in enumerate(class_names(), start=1):
        color, shape = name.split(" ")
        cats.append(
            {
                "id": i,
                "name": name,
                "supercategory": shape,
                "split": "novel" if name in novel else "base",
                "color": color,
                "shape": shape,
                **({"novel_kind": novel_kind(name, novel)} if name in novel else {}),
            }
        )
    return cats


def _expected_counts(cfg: ShapesConfig) -> dict[str, int]:
    return {"train": cfg.train_images, "val": cfg.val_images}


ANNOTATION_FILES = ("train.json", "val.json", "captions_train.json")
PARTIAL_META = "shapes.partial.json"


class ShapesFolderError(ValueError):
    """The dataset folder holds something other than the requested shapes world; it is left alone."""


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _config_difference(recorded: dict[str, Any] | None, cfg: ShapesConfig) -> str:
    """``train_images: folder 40, requested 800; ...`` (or a note when unknown)."""
    if not isinstance(recorded, dict):
        return "its generation parameters are unreadable"
    wanted = cfg.model_dump(mode="json")
    diff = [f"{k}: folder {recorded.get(k)!r}, requested {wanted.get(k)!r}"
            for k in sorted(set(recorded) | set(wanted)) if recorded.get(k) != wanted.get(k)]
    return "; ".join(diff) or "same parameters, other generator version"


def _generated_files(out_dir: Path) -> list[Path]:
    """The files in ``out_dir`` that this generator would write (some may be foreign)."""
    found = [out_dir / "annotations" / name for name in ANNOTATION_FILES if (out_dir / "annotations" / name).is_file()]
    for split in SPLIT_CODES:
        folder = out_dir / "images" / split
        if folder.is_dir():
            found += [p for p in folder.iterdir() if _IMAGE_NAME.match(p.name)]
    return found


def _content_problems(out_dir: Path, cfg: ShapesConfig, meta: dict[str, Any]) -> list[str]:
    """How a folder generated with these parameters differs from what was written."""
    problems = []
    digests = meta.get("digests")  # None in worlds written before digests were recorded
    for name in ANNOTATION_FILES:
        path = out_dir / "annotations" / name
        if not path.is_file():
            problems.append(f"annotations/{name} is missing")
        elif digests is not None and digests.get(name) != file_digest(path):
            problems.append(f"annotations/{name} differs from the generated file")
    for split, count in _expected_counts(cfg).items():
        folder = out_dir / "images" / split
        found = sum(1 for p in folder.iterdir() if _IMAGE_NAME.match(p.name)) if folder.is_dir() else 0
        if found != count:
            problems.append(f"images/{split} has {found} images, the world has {count}")
    return problems


def _check_folder(out_dir: Path, cfg: ShapesConfig, key: str) -> bool:
    """True when ``out_dir`` holds exactly this world; False when it may be (re)generated.

    Generating may overwrite only a folder without generator files, or one this
    generator left unfinished with the same parameters (``shapes.partial.json``). A
    finished world of other parameters, a finished world whose files were changed
    since, or files that no generation of these parameters wrote raise
    :class:`ShapesFolderError` naming the difference: the folder is never wiped.
    """
    meta = _read_meta(out_dir / "shapes.json")
    if meta is not None:
        if meta.get("key") != key:
            raise ShapesFolderError(
                f"{out_dir} holds another shapes world ({_config_difference(meta.get('config'), cfg)}); "
                f"it is not overwritten. Point dataset.root at another folder or delete this one."
            )
        problems = _content_problems(out_dir, cfg, meta)
        if problems:
            raise ShapesFolderError(
                f"{out_dir} holds the shapes world {key} but its files were changed since it was generated "
                f"({'; '.join(problems)}); it is not overwritten. Delete the folder to generate it again."
            )
        return True
    partial = _read_meta(out_dir / PARTIAL_META)
    if partial is not None and partial.get("key") != key:
        raise ShapesFolderError(
            f"{out_dir} holds an unfinished generation of another shapes world "
            f"({_config_difference(partial.get('config'), cfg)}); it is not overwritten."
        )
    existing = _generated_files(out_dir)
    if partial is None and existing:
        raise ShapesFolderError(
            f"{out_dir} has {len(existing)} files that ovdlab's shapes generator did not write "
            f"(no shapes.json, e.g. {existing[0]}); it is not overwritten. Point dataset.root at an empty folder."
        )
    return False


def _clear_previous(out_dir: Path) -> None:
    """Remove only the files this generator writes (never other files in ``out_dir``)."""
    (out_dir / "shapes.json").unlink(missing_ok=True)
    for name in ANNOTATION_FILES:
        (out_dir / "annotations" / name).unlink(missing_ok=True)
    for split in SPLIT_CODES:
        folder = out_dir / "images" / split
        if folder.is_dir():
            for p in folder.iterdir():
                if _IMAGE_NAME.match(p.name):
                    p.unlink()


def _save_image(img: np.ndarray, path: Path, image_format: str) -> None:
    pil = Image.fromarray(img, mode="RGB")
    if image_format == "png":
        pil.save(path, format="PNG", compress_level=1)
    else:
        pil.save(path, format="JPEG", quality=95)


def generate_shapes(out_dir: Path, cfg: ShapesConfig | None = None) -> Path:
    """Generate the shapes world into ``out_dir`` (skipped when already complete).

    Returns ``out_dir``. A folder whose ``shapes.json`` carries the same content key
    and whose files are unchanged is reused; an empty folder, or one this generator
    left unfinished with the same parameters, is (re)generated; anything else is
    refused (:func:`_check_folder`). ``shapes.json`` is written last, so an
    interrupted run is never taken for a complete dataset.
    """
    cfg = cfg if cfg is not None else ShapesConfig()
    out_dir = Path(out_dir)
    novel = _validate(cfg)
    key = dataset_key(cfg)
    if _check_folder(out_dir, cfg, key):
        log.info("shapes dataset %s already complete at %s; not regenerating", key, out_dir)
        return out_dir
    log.info("generating shapes dataset %s into %s", key, out_dir)
    _clear_previous(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / PARTIAL_META, {"key": key, "config": cfg.model_dump(mode="json")})
    categories = _categories(novel)
    cat_id = {c["name"]: c["id"] for c in categories}
    ext = cfg.image_format
    counts: dict[str, Any] = {}
    next_image_id = 1
    for split in ("train", "val"):
        folder = out_dir / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        captions: list[dict[str, Any]] = []
        n_images = _expected_counts(cfg)[split]
        for index in progress(range(n_images), desc=f"shapes world: {split} images", unit="img"):
            image_id = next_image_id + index
            img, placed, texts = _generate_image(cfg, split, index)
            file_name = f"{image_id:06d}.{ext}"
            _save_image(img, folder / file_name, ext)
            images.append({"id": image_id, "file_name": file_name, "width": cfg.image_size, "height": cfg.image_size})
            for p, text in zip(placed, texts):
                is_novel = p.obj.name in novel
                if split == "train":
                    captions.append(
                        {"image_id": image_id, "bbox": list(p.box), "category_id": cat_id[p.obj.name], "caption": text}
                    )
                if split == "train" and is_novel and not cfg.oracle:
                    continue
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": cat_id[p.obj.name],
                        "bbox": list(p.box),
                        "area": float(p.area),
                        "iscrowd": 0,
                    }
                )
        next_image_id += n_images
        coco = {
            "info": {"description": "ovdlab shapes world", "version": key},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        write_json_atomic(out_dir / "annotations" / f"{split}.json", coco)
        counts[split] = {"images": len(images), "annotations": len(annotations)}
        if split == "train":
            write_json_atomic(out_dir / "annotations" / "captions_train.json", {"captions": captions})
            counts["train_captions"] = len(captions)
    meta = {
        "generator": __name__,
        "version": GENERATOR_VERSION,
        "key": key,
        "config": cfg.model_dump(mode="json"),
        "classes": class_names(),
        "novel": sorted(novel, key=class_names().index),
        "counts": counts,
        "digests": {name: file_digest(out_dir / "annotations" / name) for name in ANNOTATION_FILES},
    }
    write_json_atomic(out_dir / "shapes.json", meta)
    (out_dir / PARTIAL_META).unlink()
    log.info("shapes dataset %s written: %s", key, counts)
    return out_dir

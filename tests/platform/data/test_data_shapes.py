"""The synthetic shapes world: classes, split, determinism, tight boxes, reuse."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovdlab.platform.config import ShapesConfig
from ovdlab.platform.data.shapes import (
    COLOR_NAMES,
    MAX_SIZE_FRAC,
    MIN_SIZE_FRAC,
    MIN_VISIBLE_FRAC,
    PARTIAL_META,
    SHAPE_NAMES,
    ShapesFolderError,
    class_names,
    dataset_key,
    generate_image,
    generate_shapes,
    mask_box,
    render_mask,
)

SMALL = ShapesConfig(seed=3, train_images=20, val_images=10, image_size=96)


def _load(root: Path, name: str) -> dict:
    return json.loads((root / "annotations" / name).read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "world", SMALL)


def test_class_names_are_color_major_and_complete() -> None:
    names = class_names()
    assert len(names) == len(COLOR_NAMES) * len(SHAPE_NAMES) == 20
    assert names[0] == "red circle" and names[-1] == "yellow star"
    assert {n.split(" ")[0] for n in names} == set(COLOR_NAMES)
    assert {n.split(" ")[1] for n in names} == set(SHAPE_NAMES)


def test_layout_and_category_tags(world: Path) -> None:
    train, val = _load(world, "train.json"), _load(world, "val.json")
    assert len(list((world / "images" / "train").glob("*.png"))) == SMALL.train_images
    assert len(list((world / "images" / "val").glob("*.png"))) == SMALL.val_images
    assert len(train["images"]) == SMALL.train_images and len(val["images"]) == SMALL.val_images
    assert train["categories"] == val["categories"]
    cats = train["categories"]
    assert [c["id"] for c in cats] == list(range(1, 21))
    assert [c["name"] for c in cats] == class_names()
    for c in cats:
        assert c["name"] == f"{c['color']} {c['shape']}"
        assert c["split"] == ("novel" if c["name"] in SMALL.novel else "base")
    for img in train["images"] + val["images"]:
        split = "train" if img in train["images"] else "val"
        assert (world / "images" / split / img["file_name"]).is_file()
        assert img["file_name"] == f"{img['id']:06d}.png"
    all_ids = [i["id"] for i in train["images"] + val["images"]]
    assert len(set(all_ids)) == len(all_ids)
    meta = json.loads((world / "shapes.json").read_text())
    assert meta["config"] == SMALL.model_dump(mode="json") and len(meta["key"]) == 12


def test_two_kinds_of_novel_class_are_tagged(world: Path) -> None:
    """Compositional pairs (every attribute on some base class) and the held-out concept
    "star" (on no base class): the papers' gap between ViLD-text and ViLD needs the latter."""
    cats = _load(world, "train.json")["categories"]
    base = [c for c in cats if c["split"] == "base"]
    assert {c["color"] for c in base} == set(COLOR_NAMES)
    assert {c["shape"] for c in base} == set(SHAPE_NAMES) - {"star"}
    kinds = {c["name"]: c["novel_kind"] for c in cats if c["split"] == "novel"}
    assert kinds == {**{n: "comp" for n in ("red circle", "green square", "blue triangle", "yellow cross")},
                     **{f"{color} star": "concept" for color in COLOR_NAMES}}
    assert all("novel_kind" not in c for c in base)


def test_oracle_world_annotates_novel_boxes_in_training(tmp_path: Path) -> None:
    cfg = SMALL.model_copy(update={"train_images": 8, "val_images": 2})
    plain = generate_shapes(tmp_path / "plain", cfg)
    oracle = generate_shapes(tmp_path / "oracle", cfg.model_copy(update={"oracle": True}))
    captions = _load(plain, "captions_train.json")["captions"]
    boxes = Counter((a["image_id"], a["category_id"], tuple(a["bbox"])) for a in _load(oracle, "train.json")["annotations"])
    assert boxes == Counter((c["image_id"], c["category_id"], tuple(c["bbox"])) for c in captions)  # every object
    for part in ("images", "annotations", "categories"):
        assert _load(oracle, "val.json")[part] == _load(plain, "val.json")[part]
    assert dataset_key(cfg) != dataset_key(cfg.model_copy(update={"oracle": True}))


def test_novel_objects_only_unlabelled_in_train(world: Path) -> None:
    train, val = _load(world, "train.json"), _load(world, "val.json")
    captions = _load(world, "captions_train.json")["captions"]
    novel_ids = {c["id"] for c in train["categories"] if c["split"] == "novel"}
    assert not novel_ids & {a["category_id"] for a in train["annotations"]}
    assert novel_ids & {a["category_id"] for a in val["annotations"]}
    assert novel_ids & {c["category_id"] for c in captions}
    # Every labelled training box is also captioned: captions = base + novel objects.
    labelled = Counter((a["image_id"], tuple(a["bbox"])) for a in train["annotations"])
    captioned_base = Counter((c["image_id"], tuple(c["bbox"])) for c in captions if c["category_id"] not in novel_ids)
    assert labelled == captioned_base


def test_captions_name_the_class_verbatim(world: Path) -> None:
    names = {i + 1: n for i, n in enumerate(class_names())}
    captions = _load(world, "captions_train.json")["captions"]
    train_ids = {i["id"] for i in _load(world, "train.json")["images"]}
    assert captions and {c["image_id"] for c in captions} <= train_ids
    for cap in captions:
        assert names[cap["category_id"]] in cap["caption"]
        assert cap["caption"].startswith("a ")


def test_object_counts_per_image_in_range(world: Path) -> None:
    captions = _load(world, "captions_train.json")["captions"]
    per_train = Counter(c["image_id"] for c in captions)
    per_val = Counter(a["image_id"] for a in _load(world, "val.json")["annotations"])
    for counts, images in ((per_train, _load(world, "train.json")["images"]), (per_val, _load(world, "val.json")["images"])):
        for img in images:
            assert SMALL.min_objects <= counts[img["id"]] <= SMALL.max_objects


def test_boxes_are_tight_bounds_of_the_rerendered_shapes(world: Path) -> None:
    val = _load(world, "val.json")
    size = SMALL.image_size
    for index, img in enumerate(val["images"]):
        anns = sorted((a for a in val["annotations"] if a["image_id"] == img["id"]), key=lambda a: a["id"])
        pixels, objects = generate_image(SMALL, "val", index)
        with Image.open(world / "images" / "val" / img["file_name"]) as pil:
            stored = np.asarray(pil.convert("RGB"))
        assert np.array_equal(stored, pixels)
        assert len(objects) == len(anns)
        covered = np.zeros((size, size), dtype=bool)
        masks = [render_mask(obj, size, size) for obj in objects]
        for i in reversed(range(len(objects))):
            obj, ann, mask = objects[i], anns[i], masks[i]
            assert class_names()[ann["category_id"] - 1] == obj.name
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= size and y + h <= size and w > 0 and h > 0
            assert tuple(ann["bbox"]) == mask_box(mask)
            assert ann["area"] == float(mask.sum())
            ys, xs = np.nonzero(mask)
            assert xs.min() == x and xs.max() + 1 == x + w and ys.min() == y and ys.max() + 1 == y + h
            assert MIN_SIZE_FRAC * size <= obj.size <= MAX_SIZE_FRAC * size
            visible = mask & ~covered
            assert visible.sum() >= MIN_VISIBLE_FRAC * mask.sum()
            assert np.all(stored[visible] == np.array(obj.rgb, dtype=np.uint8))
            covered |= mask


def test_generation_is_deterministic(tmp_path: Path) -> None:
    cfg = ShapesConfig(seed=11, train_images=6, val_images=4, image_size=64)
    a = _files(generate_shapes(tmp_path / "a", cfg))
    b = _files(generate_shapes(tmp_path / "b", cfg))
    assert a.keys() == b.keys() and a == b
    other = _files(generate_shapes(tmp_path / "c", cfg.model_copy(update={"seed": 12})))
    assert other["images/train/000001.png"] != a["images/train/000001.png"]


def test_image_content_does_not_depend_on_split_size() -> None:
    few = ShapesConfig(seed=5, train_images=2, val_images=1)
    many = few.model_copy(update={"train_images": 50})
    assert np.array_equal(generate_image(few, "train", 1)[0], generate_image(many, "train", 1)[0])


def test_complete_dataset_is_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = ShapesConfig(train_images=4, val_images=2, image_size=48)
    root = generate_shapes(tmp_path / "w", cfg)
    stamp = (root / "shapes.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="ovdlab.platform.data.shapes"):
        generate_shapes(root, cfg)
    assert "already complete" in caplog.text
    assert (root / "shapes.json").stat().st_mtime_ns == stamp


def test_interrupted_generation_is_finished(tmp_path: Path) -> None:
    """A run that died mid-way (``shapes.partial.json`` left, no ``shapes.json``) is redone."""
    cfg = ShapesConfig(train_images=5, val_images=2, image_size=48)
    root = generate_shapes(tmp_path / "w", cfg)
    reference = _files(root)
    meta = (root / "shapes.json").read_text()
    (root / "shapes.json").unlink()
    (root / "images" / "train" / "000003.png").unlink()
    (root / PARTIAL_META).write_text(json.dumps({"key": dataset_key(cfg), "config": cfg.model_dump(mode="json")}))
    generate_shapes(root, cfg)
    assert _files(root) == reference and (root / "shapes.json").read_text() == meta
    assert not (root / PARTIAL_META).exists()


def test_world_of_other_parameters_is_refused_not_overwritten(tmp_path: Path) -> None:
    """The bad-input probe: a 40/20 folder was wiped and rewritten as 800/200."""
    small = ShapesConfig(train_images=4, val_images=2, image_size=48)
    root = generate_shapes(tmp_path / "w", small)
    before = _files(root)
    with pytest.raises(ShapesFolderError, match=r"train_images: folder 4, requested 6"):
        generate_shapes(root, small.model_copy(update={"train_images": 6}))
    assert _files(root) == before


@pytest.mark.parametrize("change", ["delete image", "edit annotations"])
def test_changed_world_is_refused_naming_the_change(tmp_path: Path, change: str) -> None:
    cfg = ShapesConfig(train_images=4, val_images=2, image_size=48)
    root = generate_shapes(tmp_path / "w", cfg)
    if change == "delete image":
        (root / "images" / "train" / "000003.png").unlink()
        expected = "images/train has 3 images, the world has 4"
    else:
        val = _load(root, "val.json")
        val["annotations"] = val["annotations"][:-1]
        (root / "annotations" / "val.json").write_text(json.dumps(val))
        expected = "annotations/val.json differs"
    before = _files(root)
    with pytest.raises(ShapesFolderError, match=expected):
        generate_shapes(root, cfg)
    assert _files(root) == before


def test_folder_not_written_by_the_generator_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "w"
    (root / "images" / "train").mkdir(parents=True)
    (root / "images" / "train" / "000001.png").write_bytes(b"a user's image")
    (root / "notes.txt").write_text("not ours")
    with pytest.raises(ShapesFolderError, match="did not write"):
        generate_shapes(root, ShapesConfig(train_images=2, val_images=2, image_size=48))
    assert (root / "images" / "train" / "000001.png").read_bytes() == b"a user's image"


def test_other_files_in_the_folder_are_kept(tmp_path: Path) -> None:
    root = tmp_path / "w"
    root.mkdir()
    (root / "notes.txt").write_text("not ours")
    generate_shapes(root, ShapesConfig(train_images=2, val_images=2, image_size=48))
    assert (root / "notes.txt").read_text() == "not ours"


def test_jpg_format(tmp_path: Path) -> None:
    cfg = ShapesConfig(train_images=3, val_images=2, image_size=64, image_format="jpg")
    root = generate_shapes(tmp_path / "j", cfg)
    files = sorted((root / "images" / "train").iterdir())
    assert [p.suffix for p in files] == [".jpg"] * 3
    with Image.open(files[0]) as img:
        assert img.format == "JPEG"
    assert all(i["file_name"].endswith(".jpg") for i in _load(root, "val.json")["images"])


@pytest.mark.parametrize(
    ("novel", "message"),
    [
        (["purple circle"], "unknown class"),
        (["red circle", "red circle"], "twice"),
        ([f"{color} {shape}" for color in COLOR_NAMES for shape in SHAPE_NAMES], "at least one must stay base"),
    ],
)
def test_invalid_novel_classes_are_rejected(tmp_path: Path, novel: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_shapes(tmp_path / "bad", ShapesConfig(novel=novel, train_images=1, val_images=1))
    assert not (tmp_path / "bad" / "shapes.json").exists()


def test_impossible_object_count_is_a_clear_error(tmp_path: Path) -> None:
    cfg = ShapesConfig(train_images=1, val_images=1, image_size=32, min_objects=40, max_objects=40)
    with pytest.raises(ValueError, match="min_objects"):
        generate_shapes(tmp_path / "crowded", cfg)
    assert not (tmp_path / "crowded" / "shapes.json").exists()


def test_two_hundred_images_cover_every_class(tmp_path: Path) -> None:
    cfg = ShapesConfig(seed=7, train_images=180, val_images=20, image_size=64)
    root = generate_shapes(tmp_path / "w200", cfg)
    train, val = _load(root, "train.json"), _load(root, "val.json")
    captions = _load(root, "captions_train.json")["captions"]
    assert len(train["images"]) + len(val["images"]) == 200
    base_ids = {c["id"] for c in train["categories"] if c["split"] == "base"}
    assert {a["category_id"] for a in train["annotations"]} == base_ids
    assert {c["category_id"] for c in captions} == set(range(1, 21))
    sizes = [a["bbox"][2] * a["bbox"][3] for a in train["annotations"]]
    assert min(sizes) < 0.05 * 64 * 64 < max(sizes)
    names = {i + 1: n for i, n in enumerate(class_names())}
    for img in train["images"]:
        boxes = [(a["bbox"], names[a["category_id"]]) for a in train["annotations"] if a["image_id"] == img["id"]]
        for i, (a, name_a) in enumerate(boxes):
            for b, name_b in boxes[i + 1 :]:
                if name_a.split(" ")[0] == name_b.split(" ")[0]:
                    separated = a[0] + a[2] < b[0] or b[0] + b[2] < a[0] or a[1] + a[3] < b[1] or b[1] + b[3] < a[1]
                    assert separated, f"same-colour objects touch in image {img['id']}"
